"""The kernels a compiled decode step calls as they are: custom ops the compiler sees as one node
each (a shape in, a shape out) and fuses the element-wise work around.

torch.compile cannot trace into oneDNN's prepacked (opaque) weights or fbgemm's packed matrices,
and need not: those are already single kernels. What it
fuses is everything between them (RMSNorm with the residual, rotary, SiLU-and-mul, int8's
activation quantization), which eager PyTorch runs as a dozen small operations each. A module
whose kernel is opaque registers itself (`register`) and, while being compiled, calls
`torch.ops.fareway.linear` with its handle.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_modules: dict[int, weakref.ReferenceType[Any]] = {}
_handles = itertools.count()


def register(module: Any) -> torch.Tensor:
    """A handle naming `module` to the custom ops (held weakly: a dropped model leaves nothing): a
    0-d tensor, so that one compiled decoder layer serves every layer, each passing its own."""
    handle = next(_handles)
    _modules[handle] = weakref.ref(module, lambda _: _modules.pop(handle, None))
    return torch.tensor(handle)


def _module(handle: torch.Tensor) -> Any:
    module = _modules[int(handle)]()
    if module is None:
        raise RuntimeError(f"the module behind kernel handle {handle} is gone")
    return module


@torch.library.custom_op("fareway::linear", mutates_args=())
def linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [N, in] -> [N, out_features] through the opaque kernel of module `handle` (its `opaque_forward`)."""
    return _module(handle).opaque_forward(x)


@linear.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)
