"""Linear-layer kernels, chosen per device and weight format by measurement
after the model is built (a module swap: the model code does not change).

Every format has candidate kernels; at load each candidate that runs on the
device is checked against the plain float computation and timed on a layer of
the model's own shape at batch 1 and 16, and the fastest correct one takes
every linear layer. Measured on a 2-core EPYC (Zen 4) with torch 2.13, per
layer against oneDNN fp32, cold weights, on the engine's thread:

| kernel | 576 x 3072, batch 1 / 16 / 64 | 1536 x 576 | 576 x 49152 (head) |
| --- | --- | --- | --- |
| fbgemm int8, two-level activations (`FbgemmInt8Linear`) | 3.0x / 1.4x / 1.5x | 1.8x / 1.3x / 0.9x | 6.3x / 1.6x / 1.3x |
| oneDNN, bf16 weights (this CPU has AVX512-BF16) | 2.1x / 1.8x / 1.8x | 2.0x / 1.9x / 1.7x | 2.1x / 1.8x / 1.8x |
| fbgemm int8, one 8-bit level as fbgemm quantizes | 3.4x / 2.6x / 3.1x | 5.1x / 2.4x / 3.6x | |
| `torch._int_mm`, one int8 level per token | 1.9x / 1.4x / 2.3x | 3.0x / 1.1x / 2.5x | |

(The last two quantize activations to a single 8-bit level, which cost
SmolLM2 8% of perplexity in fbgemm's case; see `quantization.py`.)

On x86 CPUs oneDNN's fp32 linear with the weight prepacked once is the
fastest fp32 kernel (1.5-4x MKL's at batch 4-64); where oneDNN is missing,
weights are kept [in, out] for MKL's `x @ W`, which streams about twice as
fast as `nn.Linear`'s layout at batch 1. GPUs' GEMMs take nn.Linear as it is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers import opaque
from workers.layers.quantization import (
    DequantInt8Linear,
    FbgemmInt8Linear,
    Int8Embedding,
    Int8PackMmLinear,
    fbgemm_available,
    quantize_int8,
)

log = logging.getLogger(__name__)

WEIGHT_FORMATS: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8,
}
"""--weights: how linear-layer weights are stored."""


class OneDnnLinear(nn.Module):
    """y = x W^T + b, W prepacked by oneDNN for this CPU (an opaque tensor).

    With half-precision weights the activations are cast to the weights' dtype
    and the result back to the input's.
    """

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(weight_dtype or linear.weight.dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.packed_weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(weight.dtype),
                                                                  requires_grad=False)
        self.handle = opaque.register(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():   # the compiler cannot see into the packed weight
            return torch.ops.fareway.linear(x, self.handle, self.out_features)
        return self.opaque_forward(x)

    def opaque_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.packed_weight.dtype
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), self.packed_weight, self.bias, "none", [], "")
        return y.to(x.dtype)


class TransposedLinear(nn.Module):
    """y = x @ W + b with W kept transposed and contiguous: [in, out], cast to x's dtype per call."""

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(weight_dtype or linear.weight.dtype)
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t.to(x.dtype)
        return y if self.bias is None else y + self.bias


class CastLinear(nn.Module):
    """nn.Linear with the weight stored in another dtype than the activations, cast per call
    (a GPU computing in the weights' own dtype gets no cast)."""

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(weight_dtype), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def _int8(kernel: type[nn.Module]) -> Callable[[nn.Linear], nn.Module]:
    def build(linear: nn.Linear) -> nn.Module:
        q, scale = quantize_int8(linear.weight, getattr(linear, "row_amax", None))
        return kernel(q.to(linear.weight.device), scale.to(linear.weight.device), linear.bias)
    return build


@dataclass(frozen=True)
class LinearKernel:
    name: str
    build: Callable[[nn.Linear], nn.Module]
    """Replaces one nn.Linear (in the compute dtype) with this kernel."""
    device_types: tuple[str, ...]
    is_available: Callable[[], bool] = lambda: True


def _kernels(weights: str) -> tuple[LinearKernel, ...]:
    dtype = WEIGHT_FORMATS[weights]
    if weights == "int8":
        return (
            LinearKernel("fbgemm-int8", _int8(FbgemmInt8Linear), ("cpu",), fbgemm_available),
            LinearKernel("int8pack-mm", _int8(Int8PackMmLinear), ("cpu", "cuda")),
            LinearKernel("dequant-int8", _int8(DequantInt8Linear), ("cpu", "cuda")),
        )
    return (
        LinearKernel(f"onednn-{weights}", lambda lin: OneDnnLinear(lin, dtype), ("cpu",),
                     torch.backends.mkldnn.is_available),
        LinearKernel(f"mkl-{weights}", lambda lin: TransposedLinear(lin, dtype), ("cpu",)),
        LinearKernel(f"dense-{weights}", lambda lin: CastLinear(lin, dtype), ("cpu", "cuda")),
    )


# Largest relative error (of the output's RMS) a kernel may show against the float reference on
# the probe; rounding the weights to the format is allowed for, a wrong kernel is far above it.
_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2, "int8": 3e-2}


@dataclass(frozen=True)
class KernelChoice:
    name: str
    seconds: dict[str, float]
    """Each correct candidate's probe time (batch 1 plus batch 16)."""


def choose_linear_kernel(weights: str, in_features: int, out_features: int, device: torch.device,
                         dtype: torch.dtype, agree: Callable[[int], int] | None = None) -> tuple[LinearKernel, KernelChoice]:
    """The fastest kernel for `weights` on `device` that computes what the float layer does. `agree`: for
    the ranks of a tensor-parallel group, maps this rank's pick (an index into the candidates) to rank 0's,
    so every shard runs one kernel (each rank's probe sways with the load the others put on the machine)."""
    generator = torch.Generator().manual_seed(0)
    probe = nn.Linear(in_features, out_features, bias=False)
    probe.weight.data = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    probe = probe.to(device=device, dtype=dtype)
    inputs = [torch.randn(batch, in_features, generator=generator).to(device=device, dtype=dtype)
              for batch in (1, 16)]
    reference = _reference(probe, weights)
    timings: dict[str, float] = {}
    candidates = {k.name: k for k in _kernels(weights) if device.type in k.device_types}
    for kernel in candidates.values():
        seconds = _probe(kernel, probe, inputs, reference, _TOLERANCE[weights])
        if seconds is not None:
            timings[kernel.name] = seconds
    if not timings:
        raise RuntimeError(f"no linear kernel for {weights} weights runs correctly on {device}")
    best = _fastest(timings)
    if (pinned := os.environ.get(PIN_KERNEL_ENV)) in timings:
        best = pinned  # every process of a tensor-parallel group, and every run, on one kernel
    if agree is not None:
        best = list(candidates)[agree(list(candidates).index(best))]
        if best not in timings:
            raise RuntimeError(f"linear kernel {best}, rank 0's pick for {weights} weights, does not run correctly "
                               f"on this rank's {device}")
    log.info("linear kernel for %s weights on %s: %s (probe %s)", weights, device.type, best,
             ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in sorted(timings.items(), key=lambda kv: kv[1])))
    return candidates[best], KernelChoice(best, timings)


PIN_KERNEL_ENV = "FAREWAY_LINEAR_KERNEL"
"""Names the linear kernel to take when it is a correct candidate (e.g. dequant-int8), instead of the
fastest measured: runs that must compute alike (a reference and a tensor-parallel split) then do,
however the machine's load sways the probe."""

# A later candidate must beat an earlier one by this factor to be taken: candidates are listed in
# the order they usually rank, and on a machine busy with other work every kernel's probe slows to
# the same scheduler-bound time, which would otherwise make the pick a coin toss.
_MARGIN = 1.25


def _fastest(timings: dict[str, float]) -> str:
    """The first candidate (in listed order) that no later one beats by _MARGIN."""
    best = next(iter(timings))
    for name, seconds in timings.items():
        if seconds * _MARGIN < timings[best]:
            best = name
    return best


def _reference(probe: nn.Linear, weights: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float computation with the weights rounded to the format, in fp32."""
    if weights == "int8":
        q, scale = quantize_int8(probe.weight)
        weight = q.float() * scale[:, None]
    else:
        weight = probe.weight.detach().to(WEIGHT_FORMATS[weights]).float()
    return lambda x: F.linear(x.float(), weight)


def _probe(kernel: LinearKernel, probe: nn.Linear, inputs: list[torch.Tensor],
           reference: Callable[[torch.Tensor], torch.Tensor], tolerance: float) -> float | None:
    """Seconds the kernel takes over the inputs (the best of 7: other load on the machine only
    ever adds time), or None if it fails or is wrong."""
    try:
        if not kernel.is_available():
            return None
        module = kernel.build(probe)
        with torch.inference_mode():
            for x in inputs:
                expected = reference(x)
                error = (module(x).float() - expected).norm() / expected.norm().clamp_min(1e-12)
                if not error.item() <= tolerance:
                    log.warning("linear kernel %s is off by %.2e on this device; not used", kernel.name, error)
                    return None
            return min(_time(module, inputs) for _ in range(7))
    except (RuntimeError, NotImplementedError) as exc:
        log.info("linear kernel %s unavailable: %s", kernel.name, str(exc).splitlines()[0])
        return None


def _time(module: nn.Module, inputs: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for x in inputs:
        module(x)
    if inputs[0].device.type == "cuda":
        torch.cuda.synchronize(inputs[0].device)
    return time.perf_counter() - started


def quantize_model(model: nn.Module, weights: str, device: torch.device, dtype: torch.dtype,
                   agree: Callable[[int], int] | None = None) -> KernelChoice | None:
    """Swaps every nn.Linear of `model` for the fastest correct kernel for `weights`, and the token
    embedding for an int8 one with int8 weights. Returns the choice (None for a model with no linear).
    `agree`: as choose_linear_kernel's.

    A tied embedding keeps the weight it shares with the head in float or
    int8 rows: it only gathers rows, while the head's kernel holds its own
    (packed) copy. With the MKL layout the embedding becomes a view of the
    head's transposed weight instead, so the matrix is held once.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FORMATS)}, got {weights!r}")
    linears = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children()) if isinstance(child, nn.Linear)]
    if not linears:
        return None
    if weights != "int8" and WEIGHT_FORMATS[weights] == dtype and device.type != "cpu":
        return KernelChoice(f"dense-{weights}", {})  # a GPU computing in the weights' own dtype: nn.Linear as is
    kernel, choice = choose_linear_kernel(weights, *_probe_shape([c for _, _, c in linears]), device, dtype, agree)
    swapped: dict[int, nn.Module] = {}
    for parent, name, child in linears:
        replacement = kernel.build(child)
        swapped[id(child.weight)] = replacement
        setattr(parent, name, replacement)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                if weights == "int8":
                    setattr(parent, name, Int8Embedding(child, dtype))
                elif isinstance(swapped.get(id(child.weight)), TransposedLinear) and \
                        swapped[id(child.weight)].weight_t.dtype == dtype:
                    child.weight = nn.Parameter(swapped[id(child.weight)].weight_t.t(), requires_grad=False)
    return choice


def _probe_shape(linears: list[nn.Linear]) -> tuple[int, int]:
    """(in, out) of the largest layer, its output capped at 8,192 to keep the probe quick."""
    layer = max(linears, key=lambda lin: lin.in_features * min(lin.out_features, 8192))
    return layer.in_features, min(layer.out_features, 8192)
