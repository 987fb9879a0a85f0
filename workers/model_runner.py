"""The ModelRunner owns the device: the model's weights, the KV cache tensors,
and the forward pass and sampling of each engine step."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from workers.config import COMPUTE_DTYPES, RunnerConfig
from workers.engine.scheduler import ScheduledSequence, StepPlan
from workers.hardware import Hardware, default_dtype, detect, rank_device
from workers.layers.attention import AttentionMetadata, DecodeBatch, PrefillSlice, causal_mask
from workers.layers.kv_cache import RecordingKVCache, kv_bytes_per_token_per_layer, make_kv_cache
from workers.layers.linear import quantize_model
from workers.layers.quantization import Int8Embedding
from workers.loader.checkpoint import Checkpoint
from workers.models.llama import build_model
from workers.parallel.group import RankGroup
from workers.parallel.sharding import num_kv_heads_per_rank, shard_model
from workers.parallel.step import StepInputs
from workers.sampling import sample

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES: dict[str, torch.dtype] = {name: _TORCH_DTYPES[dtype] for name, dtype in COMPUTE_DTYPES.items()}
_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor     # [N]
    positions: torch.Tensor     # [N]
    metadata: AttentionMetadata
    sample_rows: list[int]      # rows of the step's tokens whose logits are sampled
    sample_index: list[int]     # which scheduled sequence each of those rows belongs to


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, config: RunnerConfig, group: RankGroup | None = None) -> None:
        """This rank's shard of the model, on its device. `group`: the ranks of a tensor-parallel replica,
        started first (workers/parallel/launcher.py); None: a replica of one device."""
        if group is None:
            if config.tensor_parallel_size > 1:
                raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} needs its ranks started first "
                                 "(workers.parallel.launcher.launch_ranks)")
            group = RankGroup(0, 1, rank_device(config.device, 0, 1))
        self.config = config
        self.group = group
        self.device = self.group.device
        self.dtype = DTYPES[config.dtype] if config.dtype else default_dtype(self.device)
        self.hardware: Hardware = detect(self.device, self.group.world_size)
        self.num_devices = self.hardware.device_count
        self.model_config = checkpoint.config
        context = min(config.max_model_len or checkpoint.config.max_position_embeddings,
                      checkpoint.config.max_position_embeddings)
        self.model = build_model(checkpoint.config, checkpoint.tensors, device=self.device,
                                 dtype=self.dtype, max_positions=context)
        self.parameter_count = _count_parameters(self.model)
        shard_model(self.model, self.group.rank, self.group.world_size)
        self.num_kv_heads_per_rank = num_kv_heads_per_rank(checkpoint.config, self.group.world_size)
        choice = quantize_model(self.model, config.weights, self.device, self.dtype)
        self.linear_kernel = choice.name if choice else "none"
        """The kernel running the linear layers, e.g. "fbgemm-int8", "onednn-fp32"."""
        self.weight_bytes = self.group.sum(_module_bytes(self.model.modules()))
        """Bytes the weights take on the replica's devices (every rank's shard), as the kernels hold
        them (packed copies included)."""
        self.decode_bytes_per_step = _module_bytes(
            m for m in self.model.modules() if not isinstance(m, (torch.nn.Embedding, Int8Embedding)))
        """Weight bytes a decode step reads: all but the embedding tables, of which it reads a row per token."""
        self.block_size = config.block_size
        self.num_kv_blocks = self._num_kv_blocks()
        self.max_model_len = min(context, self.num_kv_blocks * self.block_size)
        self._allocate_kv_cache()
        self._generators: dict[str, torch.Generator] = {}
        if config.kv_cache_dtype == "fp8_e4m3":
            self._calibrate_kv_scales(checkpoint.tokenizer.encode(_CALIBRATION_TEXT))
        log.info("model on %s (%s, %s): %s weights (%s), %.1f MiB; %d KV blocks of %d tokens, %s",
                 self.device, self.hardware.hardware_class, self.dtype, config.weights, self.linear_kernel,
                 self.weight_bytes / 2**20, self.num_kv_blocks, self.block_size, config.kv_cache_dtype)

    @property
    def kv_cache_dtype(self) -> str:
        """The KV cache's storage format, auto resolved: "fp32", "bf16", "fp8_e4m3", "int8"..."""
        if self.config.kv_cache_dtype != "auto":
            return self.config.kv_cache_dtype
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model_config
        kv_heads = self.num_kv_heads_per_rank * self.group.world_size  # replicated KV heads count on each rank
        return c.num_layers * kv_bytes_per_token_per_layer(self.config.kv_cache_dtype, kv_heads, c.head_dim,
                                                           self.dtype)

    def _num_kv_blocks(self) -> int:
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cpu":
                budget = _CPU_KV_CACHE_BYTES
            else:
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.config.kv_cache_free_memory_fraction) * self.group.world_size
        blocks = self.group.min(budget // (self.kv_bytes_per_token * self.block_size))  # the same on every rank
        if blocks < 1:
            raise ValueError(f"a KV cache of {budget} bytes holds no block of {self.block_size} tokens "
                             f"({self.kv_bytes_per_token} bytes per token)")
        return blocks

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_kv_blocks * self.block_size * self.kv_bytes_per_token

    def max_sequences_at(self, num_tokens: int) -> int:
        """How many sequences of num_tokens tokens (prompt and completion) the KV pool holds at once."""
        if num_tokens < 1:
            raise ValueError(f"a sequence has at least one token, got {num_tokens}")
        return self.num_kv_blocks // -(-num_tokens // self.block_size)

    def _allocate_kv_cache(self) -> None:
        c = self.model_config
        for layer in self.model.model.layers:
            layer.self_attn.kv_cache = make_kv_cache(
                self.config.kv_cache_dtype, self.num_kv_blocks, self.block_size, self.num_kv_heads_per_rank,
                c.head_dim, dtype=self.dtype, device=self.device)  # this rank's KV heads only

    def _calibrate_kv_scales(self, token_ids: list[int]) -> None:
        """Sets each layer's fp8 offsets and scales from the K and V the model computes for a short
        text, run through fp32 caches that hold them exactly."""
        token_ids = token_ids[: self.num_kv_blocks * self.block_size]
        attentions = [layer.self_attn for layer in self.model.model.layers]
        caches = [attention.kv_cache for attention in attentions]
        for attention in attentions:
            attention.kv_cache = RecordingKVCache(
                -(-len(token_ids) // self.block_size), self.block_size, self.num_kv_heads_per_rank,
                self.model_config.head_dim, dtype=self.dtype, device=self.device)
        try:
            self.prompt_logprobs(token_ids)
            for attention, cache in zip(attentions, caches):
                cache.calibrate(attention.kv_cache)
        finally:
            for attention, cache in zip(attentions, caches):
                attention.kv_cache = cache

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], chunk_size: int = 512) -> torch.Tensor:
        """[len - 1] log-probability of each token after the first, given those before it, computed
        through the paged KV cache in prefill chunks (later chunks read what earlier ones stored).

        It writes the pool's first blocks directly: for calibration at load, evaluation and
        benchmarks, never while the engine serves.
        """
        num_blocks = -(-len(token_ids) // self.block_size)
        if num_blocks > self.num_kv_blocks:
            raise ValueError(f"{len(token_ids)} tokens do not fit the KV cache ({self.num_kv_blocks} blocks)")
        block_table = list(range(num_blocks))
        logprobs = []
        for start in range(0, len(token_ids), chunk_size):
            ids = token_ids[start:start + chunk_size]
            n, context_len = len(ids), start + len(ids)
            positions = list(range(start, context_len))
            slots = [block_table[p // self.block_size] * self.block_size + p % self.block_size for p in positions]
            block_ids = torch.tensor(block_table[: -(-context_len // self.block_size)], device=self.device)
            mask = None if start == 0 else causal_mask(n, context_len, self.device)
            metadata = AttentionMetadata(torch.tensor(slots, device=self.device), None,
                                         (PrefillSlice(0, n, block_ids, context_len, mask, start == 0),))
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                metadata)
            logprobs.append(torch.log_softmax(self.model.compute_logits(hidden), dim=-1))
        targets = torch.tensor(token_ids[1:], device=self.device)
        return torch.cat(logprobs)[:-1].gather(1, targets[:, None])[:, 0]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[int | None]:
        batch = self._prepare(plan)
        self.group.send_step(StepInputs(batch.input_ids, batch.positions, batch.metadata))
        hidden = self.model(batch.input_ids, batch.positions, batch.metadata)  # [N, hidden]
        tokens: list[int | None] = [None] * len(plan.scheduled)
        if not batch.sample_rows:
            return tokens
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [B, vocab]
        seqs = [plan.scheduled[i].seq for i in batch.sample_index]
        sampled = sample(logits, [s.sampling for s in seqs], [self._generator(s) for s in seqs],
                         [(s.token_ids, s.num_prompt_tokens) for s in seqs])
        for index, token in zip(batch.sample_index, sampled):
            tokens[index] = token
        return tokens

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks other than 0: run the forward pass of each step rank 0 sends, until it stops the group."""
        while (step := self.group.receive_step()) is not None:
            self.model(step.input_ids, step.positions, step.metadata)

    def close(self) -> None:
        """Stops the other ranks (rank 0) and leaves the process group."""
        self.group.close()

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
        """The step's inputs: single-token (decoding) sequences first, attended as one batch,
        then the prefill chunks."""
        order = sorted(range(len(plan.scheduled)), key=lambda i: plan.scheduled[i].num_tokens > 1)
        decodes = [plan.scheduled[i] for i in order if plan.scheduled[i].num_tokens == 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        prefills: list[PrefillSlice] = []
        sample_rows: list[int] = []
        sample_index: list[int] = []
        for index in order:
            scheduled = plan.scheduled[index]
            seq, start, n = scheduled.seq, scheduled.context_start, scheduled.num_tokens
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slot_mapping.extend(seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                                for p in range(start, start + n))
            if n > 1:
                prefills.append(self._prefill_slice(scheduled, row))
            if scheduled.samples:
                sample_rows.append(row + n - 1)
                sample_index.append(index)
        metadata = AttentionMetadata(torch.tensor(slot_mapping, device=self.device),
                                     self._decode_batch(decodes), tuple(prefills))
        return _Batch(torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device),
                      metadata, sample_rows, sample_index)

    def _decode_batch(self, decodes: list[ScheduledSequence]) -> DecodeBatch | None:
        if not decodes:
            return None
        context_lens = [s.context_start + 1 for s in decodes]
        max_blocks = -(-max(context_lens) // self.block_size)
        tables = [_padded(s.seq.block_table[: -(-n // self.block_size)], max_blocks) for s, n in zip(decodes, context_lens)]
        lens = torch.tensor(context_lens, device=self.device)
        mask = torch.arange(max_blocks * self.block_size, device=self.device)[None, :] < lens[:, None]
        return DecodeBatch(torch.tensor(tables, device=self.device), mask[:, None, None, :])

    def _prefill_slice(self, scheduled: ScheduledSequence, row: int) -> PrefillSlice:
        start, n = scheduled.context_start, scheduled.num_tokens
        context_len = start + n
        block_ids = torch.tensor(scheduled.seq.block_table[: -(-context_len // self.block_size)], device=self.device)
        is_causal = start == 0
        mask = None if is_causal else causal_mask(n, context_len, self.device)
        return PrefillSlice(row, row + n, block_ids, context_len, mask, is_causal)


def follow(checkpoint: Checkpoint, config: RunnerConfig, group: RankGroup) -> None:
    """A rank other than 0: builds its shard, runs rank 0's steps until it stops the group."""
    ModelRunner(checkpoint, config, group).follow()
    group.close()


def _padded(block_ids: list[int], length: int) -> list[int]:
    """A block table padded with block 0 to length (the padding is masked out)."""
    return block_ids + [0] * (length - len(block_ids))


def _count_parameters(model: torch.nn.Module) -> int:
    """The model's parameters, a tied embedding and head counted once (before any kernel swap)."""
    return sum(p.numel() for p in model.parameters())


def _module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the modules' own parameters and weight buffers, each storage once, plus the weights
    kernels hold outside any tensor (fbgemm's packed int8 matrices declare `weight_nbytes`).

    Opaque tensors (oneDNN's packed weights) have no storage to look through,
    so each is counted whole.
    """
    seen: set[int] = set()
    total = 0
    for module in modules:
        total += getattr(module, "weight_nbytes", 0)
        weight_buffers = [b for name, b in module.named_buffers(recurse=False) if name.startswith("weight")]
        for tensor in [*module.parameters(recurse=False), *weight_buffers]:
            if tensor.layout == torch.strided:
                storage = tensor.untyped_storage().data_ptr()
                if storage in seen:
                    continue
                seen.add(storage)
            total += tensor.numel() * tensor.element_size()
    return total


# A public-domain passage (the opening of Melville's "Moby-Dick") run through the cache at load
# to set fp8 KV scales.
_CALIBRATION_TEXT = (
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and see "
    "the watery part of the world. It is a way I have of driving off the spleen and regulating the "
    "circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly "
    "November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and "
    "bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper hand "
    "of me, that it requires a strong moral principle to prevent me from deliberately stepping into the "
    "street, and methodically knocking people's hats off - then, I account it high time to get to sea as "
    "soon as I can.")
