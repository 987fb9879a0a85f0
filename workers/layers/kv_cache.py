"""One layer's share of the paged KV pool, stored in a chosen dtype.

Blocks are [num_blocks, block_size, num_kv_heads, head_dim]; a token's slot is
block * block_size + offset. `write` stores new tokens' K and V at their
slots; `gather` returns whole blocks in the compute dtype. Prefix caching and
preemption only move block ids around, so every format reads back exactly what
was written, whoever wrote it.

- float (fp32, fp16, bf16): stored as is, cast on read.
- fp8_e4m3: per KV head and layer, a channel offset (the mean K or V vector)
  and a scale, fixed at load from the K and V the model computes for a short
  text (`RecordingKVCache`, then `calibrate`).
  What is stored is (x - offset) / scale; amax of x - offset, x 4 headroom,
  maps to fp8's largest value, and values beyond are clamped. fp8 keeps about
  two significant digits of each value, so storing the smaller distance from
  the mean, rather than the value, loses less: K's channels carry large
  constant offsets. No bytes per token beyond the fp8 element itself.
- int8: one scale per token and KV head (amax / 127), stored beside the blocks.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8_e4m3", "int8")
"""--kv-cache-dtype; auto stores the compute dtype."""

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
_FP8_HEADROOM = 4.0


class KVCache:
    """A float cache: K and V blocks in `storage_dtype`, read back in `dtype`."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, storage_dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)  # [blocks, block_size, Hkv, D]
        self.dtype = dtype
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=storage_dtype, device=device)
        self.v = torch.zeros(shape, dtype=storage_dtype, device=device)

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, storage_dtype: torch.dtype) -> int:
        """K and V bytes one token takes in one layer."""
        return 2 * num_kv_heads * head_dim * storage_dtype.itemsize

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slot_mapping: [N]; k, v: [N, Hkv, D]
        self._store(self.k, slot_mapping, self._encode(k))
        self._store(self.v, slot_mapping, self._encode(v))

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks, [len(block_ids) * block_size, Hkv, D] in the compute dtype."""
        k = self.k.index_select(0, block_ids).flatten(0, 1)
        v = self.v.index_select(0, block_ids).flatten(0, 1)
        return k.to(self.dtype), v.to(self.dtype)

    def read_blocks(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of each row's blocks, [B, max_blocks * block_size, Hkv, D] in the compute dtype, as
        indexing expressions: what a compiled decode step reads in place (eager steps `gather`)."""
        return self._decode(self.k, block_tables), self._decode(self.v, block_tables)

    def _decode(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        return cache[block_tables].flatten(1, 2).to(self.dtype)

    def copy_blocks(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        """Copies whole blocks (their K, V and any scales): a forked sample's own copy of a shared block."""
        for cache in self._block_tensors():
            if cache.dtype.itemsize == 1 and cache.is_floating_point():
                cache = cache.view(torch.uint8)  # no fp8 index kernels on CPU: the bytes are copied
            cache.index_copy_(0, destinations, cache.index_select(0, sources))

    def _block_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.k.dtype)

    @staticmethod
    def _store(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
        flat = cache.view(-1, *cache.shape[2:])
        if values.dtype.itemsize == 1 and values.is_floating_point():
            # index_copy_ has no fp8 kernel on CPU; the bytes are copied as they are.
            flat, values = flat.view(torch.uint8), values.view(torch.uint8)
        flat.index_copy_(0, slot_mapping, values)


class Fp8KVCache(KVCache):
    """fp8 e4m3 blocks with one channel offset and one scale per KV head, for K and for V."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                         storage_dtype=torch.float8_e4m3fn, device=device)
        self.k_offset = torch.zeros(num_kv_heads, head_dim, device=device)   # [Hkv, D]
        self.v_offset = torch.zeros(num_kv_heads, head_dim, device=device)
        self.k_scale = torch.ones(num_kv_heads, 1, device=device)            # [Hkv, 1]
        self.v_scale = torch.ones(num_kv_heads, 1, device=device)

    def calibrate(self, recorded: RecordingKVCache) -> None:
        """Sets the offsets and scales from the K and V a recording cache saw."""
        self.k_offset, self.k_scale = recorded.k_stats.offset_and_scale()
        self.v_offset, self.v_scale = recorded.v_stats.offset_and_scale()

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._store(self.k, slot_mapping, _to_fp8(k, self.k_offset, self.k_scale))
        self._store(self.v, slot_mapping, _to_fp8(v, self.v_offset, self.v_scale))

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().gather(block_ids)
        return (torch.addcmul(self.k_offset.to(self.dtype), k, self.k_scale.to(self.dtype)),
                torch.addcmul(self.v_offset.to(self.dtype), v, self.v_scale.to(self.dtype)))

    def read_blocks(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._decode(self.k, block_tables), self._decode(self.v, block_tables)
        return (torch.addcmul(self.k_offset.to(self.dtype), k, self.k_scale.to(self.dtype)),
                torch.addcmul(self.v_offset.to(self.dtype), v, self.v_scale.to(self.dtype)))


def _to_fp8(x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((x.float() - offset) / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)


class RecordingKVCache(KVCache):
    """An fp32 cache that keeps what is written exactly and records each head's channel statistics:
    the model runs a calibration text through it to set an fp8 cache's offsets and scales."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                         storage_dtype=torch.float32, device=device)
        self.k_stats, self.v_stats = _ChannelStats(), _ChannelStats()

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_stats.add(k)
        self.v_stats.add(v)
        super().write(slot_mapping, k, v)


class _ChannelStats:
    """Per KV head and channel: the sum, least and greatest of the values seen."""

    def __init__(self) -> None:
        self.count = 0
        self.sum = self.min = self.max = torch.empty(0)

    def add(self, x: torch.Tensor) -> None:
        x = x.float()   # [N, Hkv, D]
        if not self.count:
            self.sum, self.min, self.max = torch.zeros_like(x[0]), x.amin(0), x.amax(0)
        else:
            torch.minimum(self.min, x.amin(0), out=self.min)
            torch.maximum(self.max, x.amax(0), out=self.max)
        self.sum += x.sum(0)
        self.count += x.shape[0]

    def offset_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean vector [Hkv, D] and the scale [Hkv, 1] that maps the value farthest from it, with
        headroom, to fp8's largest."""
        if not self.count:
            raise ValueError("no K or V was recorded to calibrate the fp8 KV cache from")
        mean = self.sum / self.count
        amax = torch.maximum(self.max - mean, mean - self.min).amax(dim=-1, keepdim=True)
        return mean, (amax * _FP8_HEADROOM / _FP8_MAX).clamp_min(1e-8)


class Int8KVCache(KVCache):
    """int8 blocks with one fp32 scale per token and KV head, for K and for V."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                         storage_dtype=torch.int8, device=device)
        scale_shape = (num_blocks, block_size, num_kv_heads, 1)
        self.k_scale = torch.ones(scale_shape, device=device)
        self.v_scale = torch.ones(scale_shape, device=device)

    def _block_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v, self.k_scale, self.v_scale

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, storage_dtype: torch.dtype = torch.int8) -> int:
        return 2 * num_kv_heads * (head_dim + 4)

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for cache, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            x = x.float()
            scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min_(1e-8)   # [N, Hkv, 1]
            self._store(cache, slot_mapping, torch.round(x / scale).to(torch.int8))
            self._store(scales, slot_mapping, scale)

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().gather(block_ids)
        k_scale = self.k_scale.index_select(0, block_ids).flatten(0, 1).to(self.dtype)
        v_scale = self.v_scale.index_select(0, block_ids).flatten(0, 1).to(self.dtype)
        return k * k_scale, v * v_scale

    def read_blocks(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._decode(self.k, block_tables), self._decode(self.v, block_tables)
        return k * self._decode(self.k_scale, block_tables), v * self._decode(self.v_scale, block_tables)


def storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache's elements are stored in."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv cache dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    special = {"auto": dtype, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
    return special.get(kv_cache_dtype) or _FLOAT_DTYPES[kv_cache_dtype]


def kv_bytes_per_token_per_layer(kv_cache_dtype: str, num_kv_heads: int, head_dim: int,
                                 dtype: torch.dtype) -> int:
    if kv_cache_dtype == "int8":
        return Int8KVCache.bytes_per_token(num_kv_heads, head_dim)
    return KVCache.bytes_per_token(num_kv_heads, head_dim, storage_dtype(kv_cache_dtype, dtype))


def make_kv_cache(kv_cache_dtype: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                  dtype: torch.dtype, device: torch.device) -> KVCache:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_cache_dtype == "fp8_e4m3":
        return Fp8KVCache(*shape, dtype=dtype, device=device)
    if kv_cache_dtype == "int8":
        return Int8KVCache(*shape, dtype=dtype, device=device)
    return KVCache(*shape, dtype=dtype, storage_dtype=storage_dtype(kv_cache_dtype, dtype), device=device)
