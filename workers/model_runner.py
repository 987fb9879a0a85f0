"""The ModelRunner owns the device: the model's weights, the KV cache tensors,
and the forward pass and sampling of each engine step."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from workers import structured
from workers.config import COMPUTE_DTYPES, RunnerConfig
from workers.decode_step import DecodeStep
from workers.engine.scheduler import ScheduledSequence, StepPlan
from workers.engine.sequence import Logprobs, Sampled, SamplingOptions, Sequence, sample_id
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
from workers.sampling import logprobs_of, sample

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES: dict[str, torch.dtype] = {name: _TORCH_DTYPES[dtype] for name, dtype in COMPUTE_DTYPES.items()}
_CPU_KV_CACHE_BYTES = 1 << 30
# Sample i of a seeded request draws from seed + i * this (mod 2**64): every sample reproducible, each its own.
_SAMPLE_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor     # [N]
    positions: torch.Tensor     # [N]
    metadata: AttentionMetadata
    sample_rows: list[int]      # rows of the step's tokens whose logits are sampled
    sample_index: list[int]     # which scheduled sequence each of those rows belongs to
    row_starts: dict[int, int]  # each scheduled sequence's first row


@dataclass(frozen=True)
class _SampleRow:
    """One token to sample: sample `index` of a scheduled sequence, from the logits of its last row."""

    seq: Sequence
    scheduled_index: int
    logits_row: int
    index: int
    sample_id: str


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
        choice = quantize_model(self.model, config.weights, self.device, self.dtype,
                                agree=self.group.of_rank0 if self.group.world_size > 1 else None)
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
        self.eos_token_ids = checkpoint.tokenizer.eos_token_ids
        # Structured outputs' token masks are filled here while the device thread runs the forward pass
        # (the grammar engine's native code releases the GIL).
        self._grammar_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fareway-grammar")
        if config.kv_cache_dtype == "fp8_e4m3":
            self._calibrate_kv_scales(checkpoint.tokenizer.encode(_CALIBRATION_TEXT))
        self.decode_step = DecodeStep(self.model, self.device, enforce_eager=config.enforce_eager,
                                      tensor_parallel_size=self.group.world_size,
                                      scratch_slot=self.num_kv_blocks * self.block_size, block_size=self.block_size,
                                      max_batch=config.max_decode_batch, state=self._kv_tensors())
        """Pure decode steps, compiled or eager (`execution` says which)."""
        log.info("model on %s (%s, %s): %s weights (%s), %.1f MiB; %d KV blocks of %d tokens, %s",
                 self.device, self.hardware.hardware_class, self.dtype, config.weights, self.linear_kernel,
                 self.weight_bytes / 2**20, self.num_kv_blocks, self.block_size, config.kv_cache_dtype)

    @property
    def execution(self) -> str:
        """How decode steps run: "compiled", "cuda-graphs" or "eager"."""
        return self.decode_step.execution

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
            # This rank's KV heads only; one block more than the pool hands out: the decode step's scratch.
            layer.self_attn.kv_cache = make_kv_cache(
                self.config.kv_cache_dtype, self.num_kv_blocks + 1, self.block_size, self.num_kv_heads_per_rank,
                c.head_dim, dtype=self.dtype, device=self.device)

    def _kv_tensors(self) -> list[torch.Tensor]:
        """Every layer's KV cache tensors (blocks and their scales)."""
        return [tensor for layer in self.model.model.layers
                for tensor in vars(layer.self_attn.kv_cache).values() if isinstance(tensor, torch.Tensor)]

    def _calibrate_kv_scales(self, token_ids: list[int]) -> None:
        """Sets each layer's fp8 offsets and scales from the K and V the model computes for a short
        text, run through fp32 caches that hold them exactly."""
        token_ids = token_ids[: min(self.num_kv_blocks * self.block_size, self.max_model_len)]  # rotary tables end there
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
    def execute(self, plan: StepPlan) -> list[Sampled | None]:
        batch = self._prepare(plan)
        step = StepInputs(batch.input_ids, batch.positions, batch.metadata, plan.block_copies)
        self.group.send_step(step)
        rows = self._sample_rows(plan, batch)
        masks = self._start_masks(rows)  # on the grammar thread, while the forward pass runs
        hidden = self._forward(step)  # [N, hidden]
        self._record_prompt_logprobs(plan, batch, hidden)
        results: list[Sampled | None] = [None] * len(plan.scheduled)
        if not rows:
            return results
        # One logits row per sequence that samples, then repeated for the samples of a sequence forking.
        logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(batch.sample_rows, device=self.device)))
        if len(rows) > len(batch.sample_rows):
            logits = logits.index_select(0, torch.tensor([r.logits_row for r in rows], device=self.device))
        options = [r.seq.sampling for r in rows]
        constrain = None
        if masks is not None:
            def constrain(processed: torch.Tensor) -> None:
                structured.apply(processed, masks.result())
        tokens = sample(logits, options, [self._generator(r.sample_id, r.seq.sampling, r.index) for r in rows],
                        [(r.seq.token_ids, r.seq.num_prompt_tokens) for r in rows], self.eos_token_ids, constrain)
        logprobs = self._logprobs(logits, rows, tokens)
        by_sequence: dict[int, list[int]] = {}
        for row, token in zip(rows, tokens):
            by_sequence.setdefault(row.scheduled_index, []).append(token)
        for index, sampled in by_sequence.items():
            wanted = plan.scheduled[index].seq.sampling.logprobs is not None
            results[index] = Sampled(tuple(sampled), tuple(logprobs.pop(0) for _ in sampled) if wanted else ())
        return results

    def _sample_rows(self, plan: StepPlan, batch: _Batch) -> list[_SampleRow]:
        rows = []
        for logits_row, index in enumerate(batch.sample_index):
            seq = plan.scheduled[index].seq
            if seq.forked:
                rows.append(_SampleRow(seq, index, logits_row, seq.index, seq.request_id))
            else:  # its first token: sampled once per sample, each with its own generator
                rows += [_SampleRow(seq, index, logits_row, i, sample_id(seq.request_id, i))
                         for i in range(seq.sampling.n)]
        return rows

    def _start_masks(self, rows: list[_SampleRow]) -> Future[torch.Tensor] | None:
        """The step's token masks, one bitmask row per sampled row (a row without a constraint allows
        every token), filled on the grammar thread from each sequence's matcher."""
        constrained = [(i, row.seq.matcher) for i, row in enumerate(rows) if row.seq.matcher is not None]
        if not constrained:
            return None

        def fill() -> torch.Tensor:
            bitmask = structured.new_bitmask(len(rows), self.model_config.vocab_size)
            for i, matcher in constrained:
                matcher.fill(bitmask, i)
            return bitmask
        return self._grammar_thread.submit(fill)

    def _logprobs(self, logits: torch.Tensor, rows: list[_SampleRow], tokens: list[int]) -> list[Logprobs]:
        wanted = [i for i, row in enumerate(rows) if row.seq.sampling.logprobs is not None]
        if not wanted:
            return []
        index = torch.tensor(wanted, device=self.device)
        return logprobs_of(logits.index_select(0, index), torch.tensor([tokens[i] for i in wanted], device=self.device),
                           [rows[i].seq.sampling.logprobs for i in wanted])

    def _record_prompt_logprobs(self, plan: StepPlan, batch: _Batch, hidden: torch.Tensor) -> None:
        """For sequences that asked for prompt_logprobs: each prompt token's, from the step's prefill rows
        (positions already recorded, before a preemption, are not recorded again)."""
        for index, scheduled in enumerate(plan.scheduled):
            seq = scheduled.seq
            if seq.sampling.prompt_logprobs is None:
                continue
            first = len(seq.prompt_logprobs)  # the next position to record: its target is token first + 1
            start, end = scheduled.context_start, min(scheduled.context_start + scheduled.num_tokens,
                                                      seq.num_prompt_tokens - 1)
            if not start <= first < end:
                continue
            row = batch.row_starts[index] + first - start
            logits = self.model.compute_logits(hidden[row:row + end - first])
            targets = torch.tensor(seq.token_ids[first + 1:end + 1], device=self.device)
            seq.prompt_logprobs += logprobs_of(logits, targets, [seq.sampling.prompt_logprobs] * (end - first))

    def _forward(self, step: StepInputs) -> torch.Tensor:
        if step.block_copies:
            sources, destinations = (torch.tensor(ids, device=self.device) for ids in zip(*step.block_copies))
            for layer in self.model.model.layers:
                layer.self_attn.kv_cache.copy_blocks(sources, destinations)
        hidden = self.decode_step(step.input_ids, step.positions, step.metadata)
        return hidden if hidden is not None else self.model(step.input_ids, step.positions, step.metadata)

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks other than 0: run the forward pass of each step rank 0 sends, until it stops the group."""
        while (step := self.group.receive_step()) is not None:
            self._forward(step)

    def close(self) -> None:
        """Stops the other ranks (rank 0) and leaves the process group."""
        self._grammar_thread.shutdown(wait=False)
        self.group.close()

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, key: str, sampling: SamplingOptions, index: int) -> torch.Generator | None:
        """The generator of sample `key`: seeded from the request's seed (sample i's seed derived from it,
        so every sample is reproducible and each differs), else at random."""
        if sampling.is_greedy:
            return None
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed((sampling.seed + index * _SAMPLE_SEED_STRIDE) % 2**64)
            self._generators[key] = generator
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
        row_starts: dict[int, int] = {}
        for index in order:
            scheduled = plan.scheduled[index]
            seq, start, n = scheduled.seq, scheduled.context_start, scheduled.num_tokens
            row = row_starts[index] = len(input_ids)
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
                      metadata, sample_rows, sample_index, row_starts)

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
