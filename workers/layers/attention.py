"""Attention over a paged KV cache.

The cache of one layer is a pool of blocks, [num_blocks, block_size,
num_kv_heads, head_dim], stored in any format of `kv_cache`; slot = block *
block_size + offset. A step processes
the new tokens of several sequences at once; each token's K and V are written
to its slot (`slot_mapping`), then each sequence attends over its whole
context, gathered from the blocks its block table names. Sequences decoding
one token are attended together in one batched call; prefill chunks one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.kv_cache import KVCache
from workers.layers.rotary import apply_rotary
from workers.models.config import LlamaConfig


@dataclass(frozen=True)
class DecodeBatch:
    """The step's single-token sequences, attended in one batched call.

    Their query rows come first in the step: rows [0, B).
    """

    block_tables: torch.Tensor
    """[B, max_blocks] each sequence's blocks, padded with block 0."""
    mask: torch.Tensor
    """[B, 1, 1, max_blocks * block_size] True for the slots that hold the sequence's context."""


@dataclass(frozen=True)
class PrefillSlice:
    """One sequence computing several tokens (a prompt, or a chunk of one)."""

    query_start: int
    query_end: int
    """Rows [query_start, query_end) of the step's tokens belong to this sequence."""
    block_ids: torch.Tensor
    """[num_blocks] the blocks holding the sequence's context, new tokens included."""
    context_len: int
    mask: torch.Tensor | None
    """[num_query, context_len] True where a query may attend; None with is_causal."""
    is_causal: bool
    """The queries are the whole context (a prompt with nothing cached): plain causal attention."""


@dataclass(frozen=True)
class AttentionMetadata:
    """Shared by every layer in one step; built once by the ModelRunner."""

    slot_mapping: torch.Tensor
    """[N] the cache slot (block * block_size + offset) each new token's K and V are written to."""
    decode: DecodeBatch | None
    prefills: tuple[PrefillSlice, ...]


def causal_mask(num_query: int, context_len: int, device: torch.device) -> torch.Tensor:
    """[num_query, context_len]: the queries are the last num_query positions of the context."""
    query_pos = torch.arange(context_len - num_query, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    # q: [Lq, H, D], k/v: [Lc, Hkv, D] -> [Lq, H, D]
    # A batch dimension is added: SDPA's CPU kernels are several times slower on 3-D inputs.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    return out[0].transpose(0, 1)


def _attend_decodes(q: torch.Tensor, kv_cache: KVCache, decode: DecodeBatch) -> torch.Tensor:
    # q: [B, H, D] -> [B, H, D]
    # One gather and one SDPA call for the whole batch: per-sequence calls cost
    # more in dispatch than in arithmetic at decode sizes. The query heads that
    # share a KV head are folded into its query length ([B, Hkv, H / Hkv, D]),
    # which SDPA's CPU kernel runs faster than its own grouped-query path.
    b, num_heads, head_dim = q.shape
    k, v = kv_cache.gather(decode.block_tables.flatten())
    num_kv_heads = k.shape[1]
    k = k.view(b, -1, num_kv_heads, head_dim)  # [B, L, Hkv, D]
    v = v.view(b, -1, num_kv_heads, head_dim)
    grouped = q.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, k.transpose(1, 2), v.transpose(1, 2), attn_mask=decode.mask)
    return out.reshape(b, num_heads, head_dim)


def paged_decode_attention(q: torch.Tensor, kv_cache: KVCache, decode: DecodeBatch) -> torch.Tensor:
    """_attend_decodes for the compiler: written as products and sums over the blocks the block
    tables name, which it fuses into kernels that read the cache in place (no gathered copy).
    q: [B, H, D] -> [B, H, D]."""
    b, num_heads, head_dim = q.shape
    k, v = kv_cache.read_blocks(decode.block_tables)                 # [B, L, Hkv, D]
    num_kv_heads = k.shape[2]
    grouped = q.view(b, num_kv_heads, num_heads // num_kv_heads, 1, head_dim).float()
    scores = (grouped * k.transpose(1, 2)[:, :, None].float()).sum(-1) * head_dim ** -0.5   # [B, Hkv, G, L]
    scores = scores.masked_fill(~decode.mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights[..., None] * v.transpose(1, 2)[:, :, None].float()).sum(-2)              # [B, Hkv, G, D]
    return out.reshape(b, num_heads, head_dim).to(q.dtype)


def paged_attention(q: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata) -> torch.Tensor:
    # q: [N, H, D] -> [N, H, D]
    out = torch.empty_like(q)
    if metadata.decode is not None:
        b = metadata.decode.block_tables.shape[0]
        out[:b] = _attend_decodes(q[:b], kv_cache, metadata.decode)
    for seq in metadata.prefills:
        k, v = kv_cache.gather(seq.block_ids)
        rows = slice(seq.query_start, seq.query_end)
        out[rows] = _attend(q[rows], k[: seq.context_len], v[: seq.context_len], seq.mask, seq.is_causal)
    return out


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings.

    Q, K and V come from one fused projection (one matmul instead of three).
    Head counts are read from the projection's shape at run time, so a tensor-
    parallel shard (fewer heads per rank) runs the same code.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.kv_heads_ratio = config.num_heads // config.num_kv_heads
        qkv_size = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        # Bound by the ModelRunner to this layer's share of the KV pool.
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: AttentionMetadata | None) -> torch.Tensor:
        # x: [N, hidden]
        n = x.shape[0]
        qkv = self.qkv_proj(x).view(n, -1, self.head_dim)       # [N, H + 2 Hkv, D]
        num_kv = qkv.shape[1] // (self.kv_heads_ratio + 2)
        num_q = num_kv * self.kv_heads_ratio
        qk = apply_rotary(qkv[:, : num_q + num_kv], cos, sin)    # Q and K rotated together
        q, k, v = qk[:, :num_q], qk[:, num_q:], qkv[:, num_q + num_kv:]
        if metadata is None:
            # One sequence, no cache: used for scoring whole texts (tests, perplexity).
            out = _attend(q, k, v, None, is_causal=True)
        else:
            self.kv_cache.write(metadata.slot_mapping, k, v)
            if torch.compiler.is_compiling() and metadata.decode is not None and not metadata.prefills:
                out = paged_decode_attention(q, self.kv_cache, metadata.decode)
            else:
                out = paged_attention(q, self.kv_cache, metadata)
        return self.o_proj(out.reshape(n, -1))
