"""Loading a llama.cpp GGUF file into a `Checkpoint`: weights dequantized to float32 under Hugging
Face names, with the rotary row order of Q and K put back the way Hugging Face models expect it.

The header and the model's shape are read by workers/models/gguf_header.py (no torch there);
tensor types and dequantization come from `gguf`.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from gguf import GGML_QUANT_SIZES, Keys, TokenType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from workers.layers.rotary import inverse_frequencies
from workers.loader.checkpoint import Checkpoint, checkpoint_name
from workers.models.config import LlamaConfig, RopeScaling
from workers.models.gguf_header import (
    ARCHITECTURES,
    GgufHeader,
    GgufTensorInfo,
    gguf_metadata_config,
    read_header,
)
from workers.tokenizer import Tokenizer, byte_level_bpe

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3's rotary frequency scaling, which llama.cpp stores as a tensor; it becomes config.rope_scaling.
_ROPE_FACTORS = "rope_freqs.weight"


def load_gguf(path: Path) -> Checkpoint:
    """A Llama-family GGUF file as a `Checkpoint` with float32 weights."""
    with open(path, "rb") as file:
        # Unmapped once the last view of it is gone: every tensor below is a copy.
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    header = read_header(buffer, path)
    config = gguf_config(header, buffer)
    tensors = _load_tensors(header, buffer, config)
    return Checkpoint(config, tensors, gguf_tokenizer(header.metadata), checkpoint_name(path), path)


def gguf_config(header: GgufHeader, buffer: mmap.mmap) -> LlamaConfig:
    """The model's shape from its llama.cpp metadata keys, with Llama 3's rope scaling from its tensor."""
    config = gguf_metadata_config(header)
    return dataclasses.replace(config, rope_scaling=_rope_scaling(header, buffer, config.head_dim, config.rope_theta))


def _rope_scaling(header: GgufHeader, buffer: mmap.mmap, head_dim: int, rope_theta: float) -> RopeScaling | None:
    if _ROPE_FACTORS not in header.tensors:
        return None
    factors = _read_tensor(buffer, header.tensors[_ROPE_FACTORS]).double()
    return llama3_scaling_from_factors(factors, head_dim, rope_theta)


def llama3_scaling_from_factors(factors: torch.Tensor, head_dim: int, rope_theta: float) -> RopeScaling:
    """Llama 3's rope scaling parameters, recovered from the per-frequency divisors llama.cpp stores.

    Between the two wavelength bounds the divisor blends as 1 / f = 1 / factor + s (1 - 1 / factor),
    where s is linear in 1 / wavelength; the line's slope and intercept fix the parameters up to
    a common scale of low_freq_factor, original context and high_freq_factor, which cancels in
    the frequencies, so low_freq_factor = 1 (Meta's own value) loses nothing.
    """
    base = inverse_frequencies(head_dim, rope_theta, None)
    factor = factors.max().item()
    is_blended = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if is_blended.sum() < 2 or factor <= 1:
        raise ValueError("cannot recover Llama 3 rope scaling from rope_freqs.weight: too few blended frequencies")
    smooth = (1 / factors[is_blended] - 1 / factor) / (1 - 1 / factor)
    inverse_wavelength = base[is_blended] / (2 * math.pi)
    slope, intercept = np.polyfit(inverse_wavelength.numpy(), smooth.numpy(), 1)
    if intercept >= 0:
        raise ValueError("rope_freqs.weight does not follow Llama 3's rope scaling; not supported")
    high_freq_factor = 1 - 1 / intercept
    scaling = RopeScaling(factor=round(factor, 4), low_freq_factor=1.0, high_freq_factor=round(high_freq_factor, 4),
                          original_max_position_embeddings=round(slope * (high_freq_factor - 1)))
    recovered = base / inverse_frequencies(head_dim, rope_theta, scaling)
    if not torch.allclose(recovered, factors, rtol=1e-4):
        raise ValueError("rope_freqs.weight does not follow Llama 3's rope scaling; not supported")
    return scaling


def _load_tensors(header: GgufHeader, buffer: mmap.mmap, config: LlamaConfig) -> dict[str, torch.Tensor]:
    permutes_qk = ARCHITECTURES[header.architecture].permutes_qk
    tensors = {}
    for info in header.tensors.values():
        if info.name == _ROPE_FACTORS:
            continue
        name = hf_tensor_name(info.name)
        tensor = _read_tensor(buffer, info)
        if permutes_qk and ".self_attn.q_proj." in name:
            tensor = unpermute_rotary(tensor, config.num_heads)
        elif permutes_qk and ".self_attn.k_proj." in name:
            tensor = unpermute_rotary(tensor, config.num_kv_heads)
        tensors[name] = tensor
    return tensors


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a llama.cpp tensor name ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight")."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_TENSOR_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a Llama-family GGUF file")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSOR_NAMES[part]}.{kind}"


def _read_tensor(buffer: mmap.mmap, info: GgufTensorInfo) -> torch.Tensor:
    if info.ggml_type not in GGML_QUANT_SIZES:
        raise ValueError(f"tensor {info.name} has ggml type {info.ggml_type.name}, which has no known layout")
    byte_shape = quant_shape_to_byte_shape(info.shape, info.ggml_type)
    raw = np.frombuffer(buffer, np.uint8, math.prod(byte_shape), info.offset).reshape(byte_shape)
    try:
        values = dequantize(raw, info.ggml_type)
    except NotImplementedError as error:
        raise ValueError(f"tensor {info.name}: {error}") from error
    # Unquantized tensors come back as read-only views of the file: copy those.
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"]))


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` of a Q or K projection (weight or bias).

    llama.cpp rotates adjacent pairs (0, 1), (2, 3), ... of each head; Hugging Face rotates the
    two halves (0, D/2), (1, D/2 + 1), .... The converter interleaved each head's rows to match:
    [H, 2, D/2] -> [H, D/2, 2]. Here they go back.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()


def gguf_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file describes in its tokenizer.* keys."""
    model = metadata.get(Keys.Tokenizer.MODEL)
    if model not in TOKENIZER_MODELS:
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}; supported: {sorted(TOKENIZER_MODELS)}")
    # Some files name the end-of-turn token apart from EOS; generation stops at either.
    extra_eos_token_ids = [metadata[key] for key in (Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID) if key in metadata]
    return Tokenizer(
        TOKENIZER_MODELS[model](metadata),
        bos_token_id=metadata.get(Keys.Tokenizer.BOS_ID),
        eos_token_id=metadata.get(Keys.Tokenizer.EOS_ID),
        add_bos_token=metadata.get(Keys.Tokenizer.ADD_BOS, False),
        chat_template=metadata.get(Keys.Tokenizer.CHAT_TEMPLATE),
        extra_eos_token_ids=extra_eos_token_ids,
    )


def _byte_level_tokenizer(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    tokens = metadata[Keys.Tokenizer.LIST]
    token_types = metadata.get(Keys.Tokenizer.TOKEN_TYPE, [TokenType.NORMAL] * len(tokens))
    return byte_level_bpe(
        tokens, metadata.get(Keys.Tokenizer.MERGES, []),
        pre_tokenizer=metadata.get(Keys.Tokenizer.PRE, "default"),
        special_tokens=[token for token, kind in zip(tokens, token_types) if kind == TokenType.CONTROL],
        added_tokens=[token for token, kind in zip(tokens, token_types) if kind == TokenType.USER_DEFINED],
    )


TOKENIZER_MODELS = {"gpt2": _byte_level_tokenizer}
"""Tokenizer builders by GGUF tokenizer.ggml.model; "gpt2" is byte-level BPE."""
