"""Which sequences run in the next step, and how many of their tokens.

Every step is one forward pass over a mix of tokens: first one token for each
running sequence that is decoding (so a long prompt never stalls them), then
chunks of prompts being prefilled, up to a token budget. Waiting sequences are
admitted in arrival order while there is room in the batch and in the KV pool.
A sequence reserves blocks for its prompt plus max_tokens when admitted, so a
running sequence never runs out of cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.engine.block_manager import BlockManager
from workers.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    """Most sequences in one step."""
    max_num_batched_tokens: int = 1024
    """Most tokens computed in one step, decodes and prefill chunks together."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode")


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_tokens: int
    """Tokens of the sequence computed in this step, from seq.num_computed_tokens on."""

    @property
    def context_start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """The step reaches the end of the sequence, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    scheduled: tuple[ScheduledSequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.block_manager.blocks_for(seq.max_total_tokens) > self.block_manager.num_blocks:
            raise ValueError(f"{seq.request_id} needs {seq.max_total_tokens} tokens of KV cache; "
                             f"the pool holds {self.block_manager.num_blocks * self.block_manager.block_size}")
        self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        plan: list[ScheduledSequence] = []
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in (*decoding, *prefilling):
            if budget == 0:
                break
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            plan.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq, seq.max_total_tokens):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.allocate(seq, seq.max_total_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            plan.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        return StepPlan(tuple(plan))

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and returns its blocks to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Removes the request wherever it is and frees its blocks at once."""
        for seq in (*self.waiting, *self.running):
            if seq.request_id == request_id:
                if seq in self.waiting:
                    self.waiting.remove(seq)
                self.finish(seq)
                return seq
        return None
