"""int8 weights: symmetric, per output channel, for every linear layer and
the token embedding (a module swap after the model is built).

Which int8 kernel runs is chosen per device by measurement at load
(`workers.layers.linear.select_linear_kernels`); the candidates here are:

- `FbgemmInt8Linear` (x86 CPUs): fbgemm's int8 GEMM with weights prepacked
  once. fbgemm quantizes a call's activations itself, with one range for the
  whole batch (so a request's result would depend on the others in its step)
  and 8 bits (which costs SmolLM2 8% of perplexity). Instead each row is
  quantized here, per token, in two int8 levels, the value and its rounding
  remainder (x ~ amax / L * (k1 + k2 / 2L)), as two rows of integers; two
  pinned columns (-(L + 1) and L, meeting zero weights) fix fbgemm's range so
  that its scale is exactly 1 and the integers pass through unchanged.
  Integer products are exact, so the result is the int8 weights times
  activations good to ~16 bits, and no row depends on another.

  Measured on SmolLM2-135M, perplexity on the tests' 2,987-token English text
  (fp32 17.62): one 8-bit level as fbgemm quantizes, 19.10 (+8.4%); one int8
  level per token with SmoothQuant (alpha 0.75), 17.83; two levels, 17.84
  (+1.2%, what the weights alone cost). SmoothQuant helped one level but moved
  greedy tokens further from fp32's with two, so it is not used.
- `Int8PackMmLinear`: aten's weight-only int8 matmul (dequantize fused).
- `DequantInt8Linear`: dequantize the weight, then a float matmul; runs
  everywhere, the reference the others are checked against.
"""

from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers import opaque


def quantize_int8(weight: torch.Tensor, row_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([out, in] int8, [out] fp32 scale), symmetric per output channel.

    row_amax: each output channel's largest |weight| when `weight` is a slice of the rows (a
    tensor-parallel shard), so the slice is quantized as the whole row would be.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if row_amax is None else row_amax.float()
    scale = (amax / 127.0).clamp_min(1e-10)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class DequantInt8Linear(nn.Module):
    """y = x (q * scale)^T + b, the weight dequantized on every call."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, w, self.bias)


class Int8PackMmLinear(DequantInt8Linear):
    """aten's weight-only int8 matmul: the weight is dequantized inside the kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.weight_scale.to(x.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class FbgemmInt8Linear(nn.Module):
    """fbgemm's prepacked int8 GEMM on activations quantized per token in two levels
    (see the module docstring)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        padded = torch.cat([q, q.new_zeros(q.shape[0], 2)], dim=1)   # [out, in + 2]: the pinned columns
        with warnings.catch_warnings():
            # Quantized tensors are deprecated, but fbgemm's prepack takes nothing else.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                padded, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.weight_nbytes = q.numel() + 2 * scale.numel() * 4   # int8 matrix, scale and column offsets
        self.bias = bias
        # Without VNNI, fbgemm's u8 x s8 products saturate unless activations keep to 7 bits.
        self.reduce_range = not cpu_has_vnni()
        self.levels = 63 if self.reduce_range else 127
        """L: each level's integers lie in [-L, L]."""
        self.handle = opaque.register(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        # Written as few, in-place operations: at decode sizes each costs more to dispatch than to run.
        shape, levels = x.shape, self.levels
        x = x.reshape(-1, shape[-1])                                         # [N, in]
        n = x.shape[0]
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).mul_(1.0 / levels)  # [N, 1]
        u = x * scale.reciprocal()                                           # in [-L, L]
        rows = _pinned_rows(2 * n, self.in_features, levels)                 # [2N, in + 2]
        k1 = torch.round(u, out=rows[:n, :-2])
        torch.sub(u, k1, out=rows[n:, :-2]).mul_(2 * levels).round_()
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, self.reduce_range)   # [2N, out]
        y = y[:n].add_(y[n:], alpha=1.0 / (2 * levels)).mul_(scale)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward's computation for the compiler: the quantization and the sum of the two levels as
        element-wise work it fuses, fbgemm's GEMM as one opaque op."""
        shape, levels = x.shape, self.levels
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) * (1.0 / levels)
        u = x * scale.reciprocal()
        k1 = torch.round(u)
        k2 = torch.round((u - k1) * (2 * levels))
        pinned = torch.tensor([-(levels + 1.0), float(levels)], dtype=x.dtype, device=x.device)
        rows = torch.cat([torch.cat([k1, k2]), pinned.expand(2 * n, 2)], dim=1)   # [2N, in + 2]
        y = torch.ops.fareway.linear(rows, self.handle, self.out_features)                          # [2N, out]
        y = (y[:n] + y[n:] * (1.0 / (2 * levels))) * scale
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def opaque_forward(self, rows: torch.Tensor) -> torch.Tensor:
        """fbgemm's GEMM of the pinned rows (see forward)."""
        return torch.ops.quantized.linear_dynamic(rows, self.packed, self.reduce_range)


_buffers = threading.local()


def _pinned_rows(num_rows: int, in_features: int, levels: int) -> torch.Tensor:
    """A reusable [num_rows, in_features + 2] buffer whose last two columns hold -(L + 1) and L.

    Per thread (each engine runs in its own); the GEMM reads it and returns a new tensor, so a
    buffer is free again as soon as the call returns.
    """
    cache = getattr(_buffers, "rows", None)
    if cache is None:
        cache = _buffers.rows = {}
    key = (num_rows, in_features, levels)
    rows = cache.get(key)
    if rows is None:
        if len(cache) > 64:   # prefill chunks come in many sizes: keep the cache small
            cache.clear()
        rows = torch.empty(num_rows, in_features + 2)
        rows[:, -2] = -(levels + 1.0)
        rows[:, -1] = float(levels)
        cache[key] = rows
    return rows


class Int8Embedding(nn.Module):
    """Token embedding held as int8 rows with a per-row scale; rows are dequantized as gathered."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype) -> None:
        super().__init__()
        q, scale = quantize_int8(embedding.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8.index_select(0, input_ids).to(self.dtype)
        return rows * self.weight_scale.index_select(0, input_ids).to(self.dtype)[:, None]


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has AVX512-VNNI or AVX-VNNI (fbgemm's exact u8 x s8 products)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def fbgemm_available() -> bool:
    return any(engine in torch.backends.quantized.supported_engines for engine in ("fbgemm", "x86"))
