"""The ModelRunner owns the device: the model's weights, the KV cache tensors,
and the forward pass and sampling of each engine step."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workers.engine.scheduler import StepPlan
from workers.hardware import Hardware, default_device, default_dtype, detect
from workers.layers.linear import select_linear_kernels
from workers.layers.attention import AttentionMetadata, SequenceSlice, causal_mask
from workers.loader.checkpoint import Checkpoint
from workers.models.llama import build_model
from workers.sampling import sample

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_CPU_KV_CACHE_BYTES = 1 << 30
_GPU_KV_CACHE_FREE_FRACTION = 0.85


@dataclass(frozen=True)
class RunnerConfig:
    device: str | None = None
    """"cpu", "cuda", "cuda:1"; None picks a GPU if there is one."""
    dtype: str | None = None
    """Compute dtype (a key of DTYPES); None is fp32 on CPU, bf16 (or fp16) on GPUs."""
    kv_cache_memory_bytes: int | None = None
    """KV pool size; None is 1 GiB on CPU and 85% of the free memory on a GPU."""
    block_size: int = 16
    """Tokens per KV block."""
    max_model_len: int | None = None
    """Longest sequence served; None is the model's context length (capped by the pool)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor     # [N]
    positions: torch.Tensor     # [N]
    metadata: AttentionMetadata
    sample_rows: list[int]      # rows of the step's tokens whose logits are sampled
    sample_index: list[int]     # which scheduled sequence each of those rows belongs to


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, config: RunnerConfig) -> None:
        self.config = config
        self.device = torch.device(config.device) if config.device else default_device()
        self.dtype = DTYPES[config.dtype] if config.dtype else default_dtype(self.device)
        self.hardware: Hardware = detect(self.device)
        self.num_devices = self.hardware.device_count
        self.model_config = checkpoint.config
        context = min(config.max_model_len or checkpoint.config.max_position_embeddings,
                      checkpoint.config.max_position_embeddings)
        self.model = build_model(checkpoint.config, checkpoint.tensors, device=self.device,
                                 dtype=self.dtype, max_positions=context)
        select_linear_kernels(self.model, self.device)
        self.block_size = config.block_size
        self.num_kv_blocks = self._num_kv_blocks()
        self.max_model_len = min(context, self.num_kv_blocks * self.block_size)
        self._allocate_kv_cache()
        self._generators: dict[str, torch.Generator] = {}
        log.info("model on %s (%s, %s): %d KV blocks of %d tokens, %.1f MiB of weights",
                 self.device, self.hardware.hardware_class, self.dtype, self.num_kv_blocks,
                 self.block_size, self.weight_bytes / 2**20)

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model_config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def _unique_parameters(self) -> list[torch.Tensor]:
        """Parameters counted once per storage (a tied embedding may be a view of the head)."""
        seen: dict[int, torch.Tensor] = {}
        for param in self.model.parameters():
            seen.setdefault(param.untyped_storage().data_ptr(), param)
        return list(seen.values())

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self._unique_parameters())

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._unique_parameters())

    def _num_kv_blocks(self) -> int:
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cpu":
                budget = _CPU_KV_CACHE_BYTES
            else:
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _GPU_KV_CACHE_FREE_FRACTION)
        blocks = budget // (self.kv_bytes_per_token * self.block_size)
        if blocks < 1:
            raise ValueError(f"a KV cache of {budget} bytes holds no block of {self.block_size} tokens "
                             f"({self.kv_bytes_per_token} bytes per token)")
        return blocks

    def _allocate_kv_cache(self) -> None:
        c = self.model_config
        shape = (self.num_kv_blocks * self.block_size, c.num_kv_heads, c.head_dim)  # [S, Hkv, D]
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[int | None]:
        batch = self._prepare(plan)
        hidden = self.model(batch.input_ids, batch.positions, batch.metadata)  # [N, hidden]
        tokens: list[int | None] = [None] * len(plan.scheduled)
        if not batch.sample_rows:
            return tokens
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [B, vocab]
        seqs = [plan.scheduled[i].seq for i in batch.sample_index]
        sampled = sample(logits, [s.sampling for s in seqs], [self._generator(s) for s in seqs])
        for index, token in zip(batch.sample_index, sampled):
            tokens[index] = token
        return tokens

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, seq) -> torch.Generator | None:  # noqa: ANN001 - a Sequence
        if seq.sampling.is_greedy:
            return None
        generator = self._generators.get(seq.request_id)
        if generator is None:
            generator = torch.Generator(self.device)
            if seq.sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(seq.sampling.seed)
            self._generators[seq.request_id] = generator
        return generator

    def _prepare(self, plan: StepPlan) -> _Batch:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        slices: list[SequenceSlice] = []
        sample_rows: list[int] = []
        sample_index: list[int] = []
        offsets = torch.arange(self.block_size)
        for index, scheduled in enumerate(plan.scheduled):
            seq, start, n = scheduled.seq, scheduled.context_start, scheduled.num_tokens
            context_len = start + n
            table = torch.tensor(seq.block_table[: -(-context_len // self.block_size)])
            kv_slots = (table[:, None] * self.block_size + offsets).flatten()[:context_len]
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:context_len])
            positions.extend(range(start, context_len))
            slot_mapping.extend(kv_slots[start:].tolist())
            mask = causal_mask(n, context_len, self.device) if 1 < n < context_len else None
            slices.append(SequenceSlice(row, row + n, kv_slots.to(self.device), mask, is_causal=n == context_len > 1))
            if scheduled.samples:
                sample_rows.append(row + n - 1)
                sample_index.append(index)
        metadata = AttentionMetadata(torch.tensor(slot_mapping, device=self.device), tuple(slices))
        return _Batch(torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device),
                      metadata, sample_rows, sample_index)
