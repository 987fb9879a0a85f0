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
        scheduler.add(seq(name, 6, max_tokens=4))  # each prompt takes 2 blocks
    # b would leave no block free for a to grow into (the watermark), so it waits, and c behind it.
    assert [name for name, _ in advance(scheduler)] == ["a"]
    assert [s.request_id for s in scheduler.waiting] == ["b", "c"]
    scheduler.finish(scheduler.running[0])
    assert scheduler.block_manager.num_free_blocks == 4
    assert advance(scheduler) == [("b", 6)]


def test_blocks_are_taken_as_sequences_grow_not_reserved_up_front() -> None:
    scheduler = make(num_blocks=16, block_size=4)
    scheduler.add(seq("a", 3, max_tokens=40))
    advance(scheduler)
    assert scheduler.block_manager.num_used_blocks == 1  # not the 11 blocks max_tokens could need
    for _ in range(2):
        advance(scheduler)
    assert scheduler.block_manager.num_used_blocks == 2


def test_the_youngest_sequence_is_preempted_when_the_pool_runs_out() -> None:
    scheduler = make(num_blocks=4, block_size=4)
    scheduler.add(seq("a", 4, max_tokens=8))
    scheduler.add(seq("b", 4, max_tokens=8))
    scheduler.add(seq("c", 3, max_tokens=8))
    assert [name for name, _ in advance(scheduler)] == ["a", "b", "c"]  # 3 blocks used, 1 free
    c = next(s for s in scheduler.running if s.request_id == "c")
    generated = list(c.token_ids)
    plan = scheduler.schedule()  # a and b both need a second block; c is the youngest
    assert [s.seq.request_id for s in plan.scheduled] == ["a", "b"]
    assert plan.preempted == (c,)
    assert (c.status, c.num_computed_tokens, c.block_table, c.token_ids) == (SequenceStatus.WAITING, 0, [], generated)
    assert list(scheduler.waiting) == [c] and scheduler.stats.num_preemptions == 1


def test_a_sequence_preempts_itself_when_it_is_the_youngest_and_recomputes_later() -> None:
    scheduler = make(num_blocks=3, block_size=4)
    scheduler.add(seq("a", 3, max_tokens=8))
    scheduler.add(seq("b", 3, max_tokens=8))
    names = set()
    for _ in range(40):
        if not scheduler.has_work:
            break
        for name, _ in advance(scheduler):
            names.add(name)
        for s in list(scheduler.running):
            if s.num_completion_tokens >= s.sampling.max_tokens:
                scheduler.finish(s)
    assert not scheduler.has_work and names == {"a", "b"}
    assert scheduler.stats.num_preemptions >= 1
    assert scheduler.block_manager.num_free_blocks == 3


def test_max_num_seqs_caps_the_batch() -> None:
    scheduler = make(max_num_seqs=2)
    for name in "abc":
        scheduler.add(seq(name, 2))
    assert len(advance(scheduler)) == 2


def test_abort_frees_blocks_at_once_wherever_the_request_is() -> None:
    scheduler = make(num_blocks=8, block_size=4)
    scheduler.add(seq("a", 8, max_tokens=8))
    scheduler.add(seq("b", 4))
    advance(scheduler)
    assert scheduler.block_manager.num_free_blocks == 5
    assert scheduler.abort("a") is not None and scheduler.block_manager.num_free_blocks == 7
    assert scheduler.abort("b") is not None and not scheduler.has_work
    assert scheduler.block_manager.num_free_blocks == 8
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


def test_the_control_plane_imports_no_torch() -> None:
    """Sequence, BlockManager, Scheduler, the meter and the engine loop run without torch."""
    import subprocess
    import sys

    code = ("import sys, workers.engine.llm_engine, workers.engine.shared_prefix; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
