"""Loading a llama.cpp GGUF file into a `Checkpoint`: weights dequantized to float32 under Hugging
Face names, with the rotary row order of Q and K put back the way Hugging Face models expect it.

The header is parsed here with `struct` rather than `gguf.GGUFReader`: the reader wraps every
vocabulary string and token type in its own numpy view, which costs about 7 s for SmolLM2's
49k-token vocabulary against 0.3 s here. Key names, tensor types and dequantization come from `gguf`.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys, TokenType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from workers.layers.rotary import inverse_frequencies
from workers.loader.checkpoint import Checkpoint, checkpoint_name
from workers.models.config import LlamaConfig, RopeScaling
from workers.tokenizer import Tokenizer, byte_level_bpe

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_REQUIRED = object()

_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("?"),
}


@dataclass(frozen=True)
class GgufTensorInfo:
    """Where one tensor lives in the file."""

    name: str
    shape: tuple[int, ...]
    """In torch order: [out, in] for a matrix."""
    ggml_type: GGMLQuantizationType
    offset: int
    """Bytes from the start of the file."""


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata and tensor table; the tensor data stays on disk."""

    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]

    @property
    def architecture(self) -> str:
        """llama.cpp's architecture name, e.g. "llama"; the prefix of the model's metadata keys."""
        return self.metadata["general.architecture"]


@dataclass(frozen=True)
class GgufArchitecture:
    """What loading one llama.cpp architecture as a Llama-family model takes."""

    permutes_qk: bool
    """llama.cpp's converter reordered Q/K rows for its interleaved rotary kernel."""


ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture(permutes_qk=True),
    "qwen2": GgufArchitecture(permutes_qk=False),
}

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


def read_header(buffer: mmap.mmap, path: Path) -> GgufHeader:
    """The metadata and tensor table at the start of a GGUF file."""
    if buffer[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with {_MAGIC!r})")
    try:
        return _parse_header(_HeaderReader(buffer, offset=4), path)
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is truncated or corrupt: {error}") from error


def _parse_header(reader: _HeaderReader, path: Path) -> GgufHeader:
    version = reader.scalar(GGUFValueType.UINT32)
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; supported versions: {_SUPPORTED_VERSIONS}")
    num_tensors = reader.scalar(GGUFValueType.UINT64)
    num_keys = reader.scalar(GGUFValueType.UINT64)
    metadata = dict(reader.key_value() for _ in range(num_keys))
    if "general.architecture" not in metadata:
        raise ValueError(f"{path} has no general.architecture in its metadata")
    entries = [reader.tensor_entry() for _ in range(num_tensors)]
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = (reader.offset + alignment - 1) // alignment * alignment
    tensors = {name: GgufTensorInfo(name, shape, ggml_type, data_start + offset)
               for name, shape, ggml_type, offset in entries}
    return GgufHeader(metadata, tensors)


class _HeaderReader:
    """Reads GGUF's little-endian values one after another."""

    def __init__(self, buffer: mmap.mmap, offset: int) -> None:
        self._buffer = buffer
        self.offset = offset

    def scalar(self, value_type: GGUFValueType) -> Any:
        dtype = _SCALAR_DTYPES[value_type]
        (value,) = struct.unpack_from(f"<{dtype.char}", self._buffer, self.offset)
        self.offset += dtype.itemsize
        if value_type == GGUFValueType.FLOAT32:
            # Converters write config floats (1e-5) as float32; keep the decimal they were given.
            return float(str(np.float32(value)))
        return value

    def string(self) -> str:
        length = self.scalar(GGUFValueType.UINT64)
        start, self.offset = self.offset, self.offset + length
        return self._buffer[start:self.offset].decode("utf-8")

    def value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        if value_type not in _SCALAR_DTYPES:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.scalar(value_type)

    def array(self) -> list[Any]:
        item_type = GGUFValueType(self.scalar(GGUFValueType.UINT32))
        count = self.scalar(GGUFValueType.UINT64)
        if item_type in _SCALAR_DTYPES:
            # In one go: a vocabulary's token types are 10^5 numbers.
            dtype = _SCALAR_DTYPES[item_type]
            values = np.frombuffer(self._buffer, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return values
        return [self.value(item_type) for _ in range(count)]

    def key_value(self) -> tuple[str, Any]:
        key = self.string()
        return key, self.value(GGUFValueType(self.scalar(GGUFValueType.UINT32)))

    def tensor_entry(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self.string()
        num_dims = self.scalar(GGUFValueType.UINT32)
        dims = [self.scalar(GGUFValueType.UINT64) for _ in range(num_dims)]
        ggml_type = GGMLQuantizationType(self.scalar(GGUFValueType.UINT32))
        offset = self.scalar(GGUFValueType.UINT64)
        # ggml lists the fastest-moving dimension first, torch last.
        return name, tuple(reversed(dims)), ggml_type, offset


def gguf_config(header: GgufHeader, buffer: mmap.mmap) -> LlamaConfig:
    """The model's shape from its llama.cpp metadata keys."""
    _check_supported(header)
    architecture, metadata, tensors = header.architecture, header.metadata, header.tensors

    def value(template: str, default: Any = _REQUIRED) -> Any:
        key = template.format(arch=architecture)
        if key not in metadata and default is _REQUIRED:
            raise ValueError(f"the GGUF file has no {key} in its metadata")
        return metadata.get(key, default)

    hidden_size = value(Keys.LLM.EMBEDDING_LENGTH)
    num_heads = value(Keys.Attention.HEAD_COUNT)
    head_dim = value(Keys.Attention.KEY_LENGTH, hidden_size // num_heads)
    rope_theta = value(Keys.Rope.FREQ_BASE, 10_000.0)
    _check_head_dims(value(Keys.Attention.VALUE_LENGTH, head_dim), value(Keys.Rope.DIMENSION_COUNT, head_dim),
                     head_dim)
    return LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden_size,
        intermediate_size=value(Keys.LLM.FEED_FORWARD_LENGTH),
        num_layers=value(Keys.LLM.BLOCK_COUNT),
        num_heads=num_heads,
        num_kv_heads=value(Keys.Attention.HEAD_COUNT_KV, num_heads),
        head_dim=head_dim,
        rms_norm_eps=value(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(header, buffer, value(Keys.Rope.SCALING_TYPE, "none"), head_dim, rope_theta),
        max_position_embeddings=value(Keys.LLM.CONTEXT_LENGTH),
        # llama.cpp writes an output matrix only when it is not the embedding matrix.
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
    )


def _check_supported(header: GgufHeader) -> None:
    if header.architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {header.architecture!r}; supported: {sorted(ARCHITECTURES)}")
    if "token_embd.weight" not in header.tensors:
        raise ValueError("the GGUF file has no token_embd.weight tensor")


def _check_head_dims(value_dim: int, rotary_dim: int, head_dim: int) -> None:
    if value_dim != head_dim:
        raise ValueError(f"value heads of {value_dim} dims differ from key heads of {head_dim}; not supported")
    if rotary_dim != head_dim:
        raise ValueError(f"rotary embedding over {rotary_dim} of {head_dim} head dims (partial rotary) is not supported")


def _rope_scaling(header: GgufHeader, buffer: mmap.mmap, scaling_type: str,
                  head_dim: int, rope_theta: float) -> RopeScaling | None:
    if scaling_type != "none":
        raise ValueError(f"rope scaling type {scaling_type!r} is not supported (only Llama 3's)")
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
