"""Decode steps compiled: the model's forward for steps in which every sequence decodes one token,
run as a few fused kernels instead of about 25 small operations per layer.

At decode sizes a step's time goes to dispatching operations, not to reading weights or doing
math (SmolLM2's int8 step read its weights at 12% of the memory bandwidth). So, as gpt-fast
compiles the whole step and vLLM and SGLang capture it as CUDA graphs:

- CPU: `torch.compile` with inductor's C++ backend, of one decoder layer: every layer runs the
  same compiled code with its own weights (a whole-model graph took 100-200 s to compile on a
  2-core machine; one layer, a thirtieth of it). The linear kernels and fbgemm's GEMM are opaque
  ops (`workers.layers.opaque`); everything between them (RMSNorm with the residual, rotary,
  SiLU-and-mul, int8's activation quantization, the paged decode attention reading the KV
  blocks in place) is fused. Two graphs: one sequence, and any batch (the batch and the context
  are symbolic sizes), both compiled at load, so nothing compiles while serving. The embedding
  and the final norm run eager.
- CUDA and ROCm: the same compiled forward, captured as CUDA graphs (`reduce-overhead`), one per
  batch-size bucket; a step's batch is padded to its bucket, the padding rows writing their K
  and V to a scratch block no sequence owns.
- Eager, operation by operation: `enforce_eager`, tensor-parallel ranks (the all-reduce is not
  traced), no C++ compiler, or a compile that fails. One log line says which path runs, and
  why; `GetModelInfo` reports it.

Prefill and mixed steps run eager: their shapes vary with every prompt, and their time is in
the matrix multiplies already.

Compiled code is cached on disk by inductor (`TORCHINDUCTOR_CACHE_DIR`, by default under
`~/.cache/fareway/inductor` here), so a restart of the same model on the same machine reuses it
and only traces.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from workers.layers.attention import AttentionMetadata, DecodeBatch

log = logging.getLogger(__name__)

GPU_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Batch sizes a GPU captures a graph for; a step is padded to the next one."""
_MIN_BLOCKS = 2
"""Block tables are padded to at least this many columns: a size of 1 would be a graph of its own."""

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def _layer_forward(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   metadata: AttentionMetadata) -> torch.Tensor:
    """One decoder layer: what the CPU path compiles once for all of them."""
    return layer(x, (cos, sin), metadata)


def _default_cache_dir() -> None:
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "fareway" / "inductor")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call, if there is one."""
    from torch._inductor import config
    cxx = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    for candidate in (os.environ.get("CXX"), cxx, "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


class DecodeStep:
    """The forward pass of pure decode steps, compiled where the device allows (else None: eager)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, enforce_eager: bool, tensor_parallel_size: int,
                 scratch_slot: int, block_size: int, max_batch: int, state: list[torch.Tensor] = ()) -> None:
        """`state`: tensors the step reads and writes in place (the KV cache), at fixed addresses: a
        CUDA graph captures them as they are."""
        self.device = device
        self.scratch_slot = scratch_slot
        """A KV slot no sequence owns: where padding rows and the warm-up write."""
        self.block_size = block_size
        self.max_batch = max_batch
        self.compile_seconds = 0.0
        self.compiled_steps = 0
        """Steps the compiled forward ran (the others ran eager)."""
        self._compiled: Forward | None = None
        self.execution, self.reason = self._choose(enforce_eager, tensor_parallel_size)
        if self._graphs:
            for tensor in state:
                torch._dynamo.mark_static_address(tensor)
        self.model = model
        """The LlamaForCausalLM whose steps this runs."""
        if self.execution != "eager":
            self._compile()
        log.info("decode steps run %s (%s)%s", self.execution, self.reason,
                 f"; compiled in {self.compile_seconds:.1f} s" if self._compiled else "")

    def _choose(self, enforce_eager: bool, tensor_parallel_size: int) -> tuple[str, str]:
        if enforce_eager:
            return "eager", "enforce_eager is set"
        if tensor_parallel_size > 1:
            return "eager", "tensor-parallel ranks run eager: the compiled step does not trace the all-reduce"
        if self.device.type == "cpu":
            if (cxx := cpp_compiler()) is None:
                return "eager", "no C++ compiler found for inductor's CPU backend (install g++ to compile)"
            return "compiled", f"torch.compile, inductor's C++ backend ({cxx})"
        if self.device.type == "cuda":
            return "cuda-graphs", "torch.compile, decode batches captured as CUDA graphs"
        return "eager", f"no compiled path for {self.device.type} devices"

    @property
    def _graphs(self) -> bool:
        return self.execution == "cuda-graphs"

    def _compile(self) -> None:
        _default_cache_dir()
        if self._graphs:
            compiled = torch.compile(self.model.forward, mode="reduce-overhead", dynamic=False)
        else:
            layer = torch.compile(_layer_forward, dynamic=False)

            def compiled(input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
                return self._by_layer(layer, input_ids, positions, metadata)
        started = time.perf_counter()
        try:
            sizes = [b for b in GPU_BUCKETS if b <= max(self.max_batch, 1)] if self._graphs else [1, 2]
            with torch.inference_mode():   # as the engine's steps run: another grad mode would be another graph
                for batch in sizes:
                    self._run(compiled, *self._warm_up_inputs(batch))
        except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager path, said once
            self.execution = "eager"
            self.reason = f"compiling the decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            return
        self.compile_seconds = time.perf_counter() - started
        self._compiled = compiled

    def _warm_up_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """A decode step of `batch` rows that writes only the scratch slot and reads only it."""
        tables = torch.full((batch, _MIN_BLOCKS), self.scratch_slot // self.block_size, device=self.device)
        mask = torch.zeros(batch, 1, 1, _MIN_BLOCKS * self.block_size, dtype=torch.bool, device=self.device)
        mask[..., self.scratch_slot % self.block_size] = True
        metadata = AttentionMetadata(torch.full((batch,), self.scratch_slot, device=self.device),
                                     DecodeBatch(tables, mask), ())
        zeros = torch.zeros(batch, dtype=torch.long, device=self.device)
        return zeros, zeros.clone(), metadata

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 metadata: AttentionMetadata) -> torch.Tensor | None:
        """The step's hidden states, or None when it is not a pure decode step or this path is eager."""
        if self._compiled is None or metadata.prefills or metadata.decode is None:
            return None
        batch = input_ids.shape[0]
        if self._graphs:
            bucket = next((b for b in GPU_BUCKETS if b >= batch), None)
            if bucket is None or bucket > max(self.max_batch, 1):
                return None
            input_ids, positions, metadata = self._padded(input_ids, positions, metadata, bucket)
        else:
            metadata = self._with_min_blocks(metadata)
        try:
            hidden = self._run(self._compiled, input_ids, positions, metadata)[:batch]
        except Exception as exc:  # noqa: BLE001 - e.g. a recompile the compiler cannot do: eager from here on
            self._compiled, self.execution = None, "eager"
            self.reason = f"the compiled decode step failed while serving ({type(exc).__name__}: " \
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
            log.error("decode steps run eager from now on: %s", self.reason)
            return None   # the step runs eager: it rewrites the same KV slots
        self.compiled_steps += 1
        return hidden

    def _run(self, compiled: Forward, input_ids: torch.Tensor, positions: torch.Tensor,
             metadata: AttentionMetadata) -> torch.Tensor:
        decode = metadata.decode
        # One graph for every context length; on CPUs, one for every batch of two or more as well (the
        # layer's other inputs are marked in _by_layer; a GPU's batches are padded to their buckets).
        torch._dynamo.mark_dynamic(decode.block_tables, 1)
        torch._dynamo.mark_dynamic(decode.mask, 3)
        if not self._graphs and input_ids.shape[0] > 1:
            for tensor in (metadata.slot_mapping, decode.block_tables, decode.mask):
                torch._dynamo.mark_dynamic(tensor, 0)
        return compiled(input_ids, positions, metadata)

    def _by_layer(self, layer: Callable[..., torch.Tensor], input_ids: torch.Tensor, positions: torch.Tensor,
                  metadata: AttentionMetadata) -> torch.Tensor:
        """The model's forward with each decoder layer through the compiled `layer`."""
        model = self.model.model
        x = model.embed_tokens(input_ids)
        cos, sin = model.rotary(positions)
        dynamic = x.shape[0] > 1
        if dynamic:
            torch._dynamo.mark_dynamic(cos, 0)
            torch._dynamo.mark_dynamic(sin, 0)
        for decoder_layer in model.layers:
            if dynamic:
                torch._dynamo.mark_dynamic(x, 0)
            x = layer(decoder_layer, x, cos, sin, metadata)
        return model.norm(x)

    def _with_min_blocks(self, metadata: AttentionMetadata, blocks: int = _MIN_BLOCKS) -> AttentionMetadata:
        """The block tables padded (with block 0, masked out) to at least `blocks` columns."""
        decode = metadata.decode
        missing = max(blocks, _MIN_BLOCKS) - decode.block_tables.shape[1]
        if missing <= 0:
            return metadata
        tables = torch.nn.functional.pad(decode.block_tables, (0, missing))
        mask = torch.nn.functional.pad(decode.mask, (0, missing * self.block_size))
        return AttentionMetadata(metadata.slot_mapping, DecodeBatch(tables, mask), ())

    def _padded(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step with padding rows up to `bucket`: token 0 at position 0, writing and reading only
        the scratch slot."""
        # Context padded to a power of two of blocks: a CUDA graph is recorded per shape.
        metadata = self._with_min_blocks(metadata, 1 << (metadata.decode.block_tables.shape[1] - 1).bit_length())
        extra = bucket - input_ids.shape[0]
        if extra == 0:
            return input_ids, positions, metadata
        decode = metadata.decode
        tables = torch.cat([decode.block_tables, decode.block_tables.new_full(
            (extra, decode.block_tables.shape[1]), self.scratch_slot // self.block_size)])
        pad_mask = torch.zeros(extra, 1, 1, decode.mask.shape[3], dtype=torch.bool, device=self.device)
        pad_mask[..., self.scratch_slot % self.block_size] = True
        zeros = input_ids.new_zeros(extra)
        return (torch.cat([input_ids, zeros]), torch.cat([positions, zeros]),
                AttentionMetadata(torch.cat([metadata.slot_mapping, zeros + self.scratch_slot]),
                                  DecodeBatch(tables, torch.cat([decode.mask, pad_mask])), ()))
