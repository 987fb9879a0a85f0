"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, rotary
embeddings, grouped-query attention and a SwiGLU MLP.

The model knows nothing of quantization, kernels or tensor parallelism; they
are transformations applied to a built model. Parameter names are Hugging
Face's, except that Q/K/V and gate/up are stacked into one projection each
(`qkv_proj`, `gate_up_proj`): `load_weights` stacks the checkpoint's parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.attention import Attention, AttentionMetadata
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import LlamaConfig

# Checkpoint parameter -> (our stacked parameter, its part), parts stacked in this order.
STACKED_PARAMS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), *rope, metadata)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata | None) -> torch.Tensor:
        # input_ids, positions: [N] -> hidden states [N, hidden]
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, rope, metadata)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Makes the output head share the embedding (again: moving devices unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, hidden] -> [N, vocab], fp32 for sampling
        return self.lm_head(hidden).float()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies checkpoint tensors (Hugging Face names) into the parameters,
        stacking q/k/v and gate/up into their fused projections."""
        # Old checkpoints saved rotary tables as buffers; ours are computed.
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        params = dict(self.named_parameters())  # a tied head appears once, as the embedding
        parts = _stack(tensors)
        missing = sorted(params.keys() - parts.keys())
        unexpected = sorted(parts.keys() - params.keys() - {"lm_head.weight"})
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                value = torch.cat(parts[name]) if isinstance(parts[name], list) else parts[name]
                if param.shape != value.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, "
                                     f"model shape {tuple(param.shape)}")
                param.copy_(value)


def _stack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Checkpoint names -> ours; a stacked parameter maps to its parts in order."""
    out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        parent, _, child = module.rpartition(".")
        if child in STACKED_PARAMS:
            target, part = STACKED_PARAMS[child]
            stacked.setdefault(f"{parent}.{target}.{leaf}", {})[part] = tensor
        else:
            out[name] = tensor
    for name, by_part in stacked.items():
        out[name] = [by_part[i] for i in sorted(by_part)]
    return out


def build_model(config: LlamaConfig, tensors: dict[str, torch.Tensor], *, device: torch.device,
                dtype: torch.dtype, max_positions: int | None = None) -> LlamaForCausalLM:
    """A model on `device` in `dtype` holding the checkpoint's weights, ready for inference.

    It is built on the meta device first so no memory is spent on random
    initial weights that would be overwritten at once.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.load_weights(tensors)
    model.model.rotary.reset_tables()
    return model.eval().requires_grad_(False)
