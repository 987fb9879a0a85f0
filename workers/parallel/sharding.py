"""Megatron-style tensor parallelism, applied to a built model (a transformation:
the model code does not change).

Each rank keeps a slice of every decoder layer:
  qkv_proj, gate_up_proj   column-parallel: the rank's rows of each stacked part
                           ([Q heads | K heads | V heads], [gate | up]), re-stacked
  o_proj, down_proj        row-parallel: the matching input columns; the partial
                           outputs are summed across ranks (one all-reduce each)
Attention heads are split so that GQA grouping holds: rank r computes the query
heads of the KV heads it holds. With more ranks than KV heads, each KV head is
replicated on the ranks whose query heads use it. Embedding, norms and the
output head are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from workers.models.config import LlamaConfig


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank computes."""

    q_heads: range
    kv_heads: range

    @property
    def kv_heads_ratio(self) -> int:
        """Query heads per KV head on this rank."""
        return len(self.q_heads) // len(self.kv_heads)


def check_shardable(config: LlamaConfig, world_size: int) -> None:
    """Raises ValueError unless the model splits evenly over `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {world_size}")
    if config.num_heads % world_size:
        raise ValueError(f"tensor_parallel_size {world_size} does not divide the {config.num_heads} query heads")
    if config.intermediate_size % world_size:
        raise ValueError(f"tensor_parallel_size {world_size} does not divide the MLP's intermediate size "
                         f"{config.intermediate_size}")
    kv = config.num_kv_heads
    if world_size <= kv and kv % world_size:
        raise ValueError(f"tensor_parallel_size {world_size} does not divide the {kv} KV heads")
    if world_size > kv and world_size % kv:
        raise ValueError(f"tensor_parallel_size {world_size} exceeds the {kv} KV heads and is not a multiple "
                         f"of them, so they cannot be replicated evenly")


def head_shard(config: LlamaConfig, rank: int, world_size: int) -> HeadShard:
    """Rank `rank`'s query heads and the KV heads they use (replicated when ranks outnumber KV heads)."""
    check_shardable(config, world_size)
    q_per_rank = config.num_heads // world_size
    q_heads = range(rank * q_per_rank, (rank + 1) * q_per_rank)
    kv_per_rank = max(1, config.num_kv_heads // world_size)
    first_kv = rank * config.num_kv_heads // world_size  # the KV head of this rank's first query head
    return HeadShard(q_heads, range(first_kv, first_kv + kv_per_rank))


def num_kv_heads_per_rank(config: LlamaConfig, world_size: int) -> int:
    return len(head_shard(config, 0, world_size).kv_heads)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, + b: each rank holds a slice of the input features.

    The slice is a plain `nn.Linear` child (`linear`), so kernel and quantization
    swaps that replace nn.Linear modules apply to it. A bias is added once, after the sum.
    """

    def __init__(self, linear: nn.Linear, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.linear = linear
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in / world_size] -> [N, out]
        y = self.linear(x)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def shard_model(model: nn.Module, rank: int, world_size: int) -> None:
    """Keeps rank `rank`'s slice of each decoder layer of a built Llama-family model, in place."""
    if world_size == 1:
        return
    config: LlamaConfig = model.config
    heads = head_shard(config, rank, world_size)
    ffn = config.intermediate_size // world_size
    ffn_rows = range(rank * ffn, (rank + 1) * ffn)
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, config, heads)
        mlp = layer.mlp
        mlp.gate_up_proj = _column_parallel(mlp.gate_up_proj, [(0, ffn_rows), (config.intermediate_size, ffn_rows)])
        mlp.down_proj = _row_parallel(mlp.down_proj, ffn_rows)


def _shard_attention(attn: nn.Module, config: LlamaConfig, heads: HeadShard) -> None:
    d = config.head_dim
    q_rows = _scaled(heads.q_heads, d)
    kv_rows = _scaled(heads.kv_heads, d)
    k_offset, v_offset = config.num_heads * d, (config.num_heads + config.num_kv_heads) * d
    attn.qkv_proj = _column_parallel(attn.qkv_proj, [(0, q_rows), (k_offset, kv_rows), (v_offset, kv_rows)])
    attn.o_proj = _row_parallel(attn.o_proj, q_rows)
    attn.kv_heads_ratio = heads.kv_heads_ratio


def _scaled(heads: range, head_dim: int) -> range:
    """Head indices -> the rows (or columns) their features occupy."""
    return range(heads.start * head_dim, heads.stop * head_dim)


def _column_parallel(linear: nn.Linear, parts: list[tuple[int, range]]) -> nn.Linear:
    """The rows of each stacked part (its offset in the fused weight, the rows within it), re-stacked."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[offset + r.start: offset + r.stop] for offset, r in parts]).clone()

    bias = None if linear.bias is None else rows(linear.bias)
    return _linear(rows(linear.weight), bias)


def _row_parallel(linear: nn.Linear, columns: range) -> RowParallelLinear:
    # Only one rank could add the bias; adding it after the all-reduce is the same and symmetric.
    part = _linear(linear.weight[:, columns.start: columns.stop].clone(), None)
    # Each output channel's largest |weight| over the whole row: int8 quantization scales the slices
    # of a row as one, so the ranks' int8 weights are exactly one device's.
    part.row_amax = linear.weight.detach().abs().amax(dim=1)
    return RowParallelLinear(part, linear.bias)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding these tensors (built on meta: no throw-away initialisation)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear
