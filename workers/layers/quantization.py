"""int8 weights: symmetric, per output channel, for every linear layer and
the token embedding (a module swap after the model is built).

Which int8 kernel runs is chosen per device by measurement at load
(`workers.layers.linear.select_linear_kernels`); the candidates here are:

- `FbgemmInt8Linear` (x86 CPUs): fbgemm's int8 GEMM with weights prepacked
  once and activations quantized per call. fbgemm quantizes the activations of
  a call with one range for the whole batch, which would make a request's
  result depend on the other requests in its step; each row is therefore
  scaled to [-1, 1] first and two pinned columns (+1, -1, meeting zero weights)
  fix the range at exactly [-1, 1], so every row is quantized on its own
  (per token) and the batch cannot change it. Integer products are exact, so
  the row's output does not depend on the batch either.
- `Int8PackMmLinear`: aten's weight-only int8 matmul (dequantize fused).
- `DequantInt8Linear`: dequantize the weight, then a float matmul; runs
  everywhere, the reference the others are checked against.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([out, in] int8, [out] fp32 scale), symmetric per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-10)
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
    """fbgemm's prepacked int8 GEMM, activations quantized per token (see the module docstring)."""

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
        self.reduce_range = not cpu_has_vnni()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        amax = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-10)     # [N, 1]
        pinned = x.new_tensor([1.0, -1.0]).expand(x.shape[0], 2)
        y = torch.ops.quantized.linear_dynamic(torch.cat([x / amax, pinned], dim=1), self.packed,
                                               self.reduce_range)
        y = (y * amax).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


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
    """Whether this x86 CPU has VNNI: without it fbgemm's u8 x s8 products saturate
    unless activations use 7 bits (reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def fbgemm_available() -> bool:
    return any(engine in torch.backends.quantized.supported_engines for engine in ("fbgemm", "x86"))
