"""The scheduler and block manager: plain Python, no model."""

from __future__ import annotations

import pytest

from workers.engine.block_manager import BlockManager
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import SamplingOptions, Sequence, SequenceStatus


def seq(name: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingOptions(max_tokens=max_tokens), 0.0)


def make(num_blocks: int = 16, block_size: int = 4, max_num_seqs: int = 4, budget: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     BlockManager(num_blocks, block_size))


def advance(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedules one step and applies it as the engine would (a sampled token is 0)."""
    plan = scheduler.schedule()
    for s in plan.scheduled:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_tokens
        if samples:
            s.seq.append_token(0)
    return [(s.seq.request_id, s.num_tokens) for s in plan.scheduled]


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    scheduler = make(budget=8)
    scheduler.add(seq("a", 20))
    assert [advance(scheduler) for _ in range(3)] == [[("a", 8)], [("a", 8)], [("a", 4)]]
    assert advance(scheduler) == [("a", 1)]  # decoding


def test_decodes_go_first_so_a_new_long_prompt_never_stalls_them() -> None:
    scheduler = make(budget=8)
    scheduler.add(seq("a", 3))
    advance(scheduler)
    scheduler.add(seq("b", 30))
    assert advance(scheduler) == [("a", 1), ("b", 7)]
    assert advance(scheduler) == [("a", 1), ("b", 7)]


def test_admission_is_first_come_first_served_and_bounded_by_the_pool() -> None:
    scheduler = make(num_blocks=4, block_size=4)  # 16 tokens of KV
    for name in "abc":
        scheduler.add(seq(name, 4, max_tokens=4))  # each reserves 2 blocks
    assert [name for name, _ in advance(scheduler)] == ["a", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]
    assert scheduler.block_manager.num_free_blocks == 0
    finished = scheduler.running[0]
    scheduler.finish(finished)
    assert scheduler.block_manager.num_free_blocks == 2
    assert ("c", 4) in advance(scheduler)


def test_max_num_seqs_caps_the_batch() -> None:
    scheduler = make(max_num_seqs=2)
    for name in "abc":
        scheduler.add(seq(name, 2))
    assert len(advance(scheduler)) == 2


def test_abort_frees_blocks_at_once_wherever_the_request_is() -> None:
    scheduler = make(num_blocks=4, block_size=4)
    scheduler.add(seq("a", 8, max_tokens=8))
    scheduler.add(seq("b", 4))
    advance(scheduler)
    assert scheduler.abort("a") is not None and scheduler.block_manager.num_free_blocks == 4
    assert scheduler.abort("b") is not None and not scheduler.has_work
    assert scheduler.abort("nobody") is None


def test_a_request_larger_than_the_whole_pool_is_refused() -> None:
    scheduler = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="pool holds 8"):
        scheduler.add(seq("a", 6, max_tokens=4))


def test_sequence_counts() -> None:
    s = seq("a", 3)
    assert (s.num_tokens, s.num_completion_tokens, s.status) == (3, 0, SequenceStatus.WAITING)
    s.append_token(7)
    assert s.completion_token_ids == [7] and s.max_total_tokens == 7


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError):
        SamplingOptions(max_tokens=1, top_p=0.0)
