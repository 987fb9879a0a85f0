"""Which sequences run in the next step, and how many of their tokens.

Every step is one forward pass over a mix of tokens (continuous batching):
first one token for each running sequence that is decoding, so a long prompt
never stalls them, then chunks of prompts being prefilled, up to a token
budget (chunked prefill). Waiting sequences are admitted in arrival order
while there is room in the batch and in the KV pool.

KV blocks are taken as they are needed: a prompt's blocks when it is admitted
(its cached prefix reused), then one block at a time as it decodes. When a
decoding sequence needs a block and the pool has none, the youngest running
sequence is preempted: its blocks are freed and it goes back to the head of
the queue, to be recomputed later (its full blocks stay in the prefix cache,
so that is often cheap). The oldest sequence is never preempted for a younger
one, so every request finishes.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from workers.engine.block_manager import BlockManager
from workers.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
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
    """Tokens of the sequence computed in this step."""
    context_start: int
    """Tokens of the sequence already in the KV cache; this step computes [context_start, +num_tokens)."""

    @property
    def samples(self) -> bool:
        """The step reaches the end of the sequence, so a next token is sampled."""
        return self.context_start + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    scheduled: tuple[ScheduledSequence, ...]
    preempted: tuple[Sequence, ...] = ()
    """Sequences sent back to the queue to make room in this step."""
    block_copies: tuple[tuple[int, int], ...] = ()
    """(source, destination) KV blocks copied before the step's forward pass (forked samples)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass
class SchedulerStats:
    num_prompt_tokens: int = 0
    """Prompt tokens of every admitted request (counted once, on first admission)."""
    num_cached_tokens: int = 0
    """Of those, the tokens served from the prefix cache."""
    num_preemptions: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


def _arrival(seq: Sequence) -> float:
    return seq.arrival_time


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Oldest first (by arrival), so the youngest is last: the one preempted first."""
        self.stats = SchedulerStats()
        # Free blocks kept back when admitting, so decodes rarely preempt right after an admission.
        self._watermark_blocks = max(1, block_manager.num_blocks // 100)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.block_manager.blocks_for(seq.max_total_tokens) > self.block_manager.num_blocks:
            raise ValueError(f"{seq.request_id} needs {seq.max_total_tokens} tokens of KV cache; "
                             f"the pool holds {self.block_manager.num_blocks * self.block_manager.block_size}")
        if seq.sampling.n > self.config.max_num_seqs:
            raise ValueError(f"n={seq.sampling.n} samples exceed this worker's {self.config.max_num_seqs} "
                             "sequences per step (max_num_seqs)")
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Adds a sample of a running parent that has just taken its first token: running with the
        parent's KV (the block copy to make, if any, returned), or, with no block free for its copy,
        first in the queue, to be recomputed from the prefix cache."""
        copy = self.block_manager.fork(parent, child)
        if copy is False:
            child.num_preemptions = parent.num_preemptions + 1  # its prompt is counted in the stats already
            self.waiting.appendleft(child)
            return None
        child.status = SequenceStatus.RUNNING
        bisect.insort(self.running, child, key=_arrival)
        return copy

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        plan: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if not self._make_room(seq, preempted):
                continue
            plan.append(ScheduledSequence(seq, 1, seq.num_computed_tokens))
            budget -= 1
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            if budget == 0:
                break
            # A prefilling sequence holds blocks for all its tokens since admission.
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            plan.append(ScheduledSequence(seq, num_tokens, seq.num_computed_tokens))
            budget -= num_tokens
        if not preempted:
            budget = self._admit(plan, budget)
        return StepPlan(tuple(plan), tuple(preempted))

    def _make_room(self, seq: Sequence, preempted: list[Sequence]) -> bool:
        """Gives a decoding sequence the block for its next token, preempting the
        youngest running sequences if need be; False if seq itself was preempted."""
        target = seq.num_computed_tokens + 1
        while not self.block_manager.can_allocate(seq, target):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # the youngest is preempted first, so the oldest ends up in front
        self.stats.num_preemptions += 1

    def _admit(self, plan: list[ScheduledSequence], budget: int) -> int:
        """Admits waiting sequences in arrival order while they fit; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.forked and len(self.running) + seq.sampling.n > self.config.max_num_seqs:
                break  # its samples will need a place each
            if not self._can_admit(seq):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            cached_tokens = self.block_manager.allocate(seq, seq.num_tokens)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached_tokens
                self.stats.num_prompt_tokens += seq.num_prompt_tokens
                self.stats.num_cached_tokens += cached_tokens
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            plan.append(ScheduledSequence(seq, num_tokens, seq.num_computed_tokens))
            budget -= num_tokens
        return budget

    def _can_admit(self, seq: Sequence) -> bool:
        bm = self.block_manager
        if not self.running:
            return bm.can_allocate(seq, seq.num_tokens)
        # Keep a few blocks back so running sequences can grow without preempting at once.
        return bm.can_allocate(seq, seq.num_tokens + self._watermark_blocks * bm.block_size)

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
