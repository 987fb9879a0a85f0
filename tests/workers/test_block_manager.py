"""The block manager and its prefix cache: plain Python, no model.

The property test drives random allocate / append / fork-by-prefix / free /
preempt sequences, with eviction whenever the pool is short, and checks after
every step that the pool's books balance and that every sequence reads back
exactly the KV its own tokens produced.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from workers.engine.block_manager import SHARED_SALT, BlockManager
from workers.engine.sequence import SamplingOptions, Sequence

BLOCK = 4


def seq(name: str, tokens: list[int], salt: str = "", shared: int = 0) -> Sequence:
    return Sequence(name, tokens, SamplingOptions(max_tokens=64), 0.0, salt, shared)


def compute(bm: BlockManager, s: Sequence) -> None:
    """What a step does for the sequence: its uncomputed tokens get KV, full blocks are registered."""
    bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_a_repeated_prompt_reuses_every_full_block_but_the_last_token() -> None:
    bm = BlockManager(16, BLOCK)
    first = seq("a", list(range(1, 11)))  # 10 tokens: 2 full blocks and a partial one
    compute(bm, first)
    second = seq("b", list(range(1, 11)) + [99])
    assert bm.allocate(second, second.num_tokens) == 8
    assert second.block_table[:2] == first.block_table[:2] and second.num_computed_tokens == 8
    assert [bm.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]


def test_a_fully_cached_block_aligned_prompt_still_computes_its_last_block() -> None:
    bm = BlockManager(16, BLOCK)
    compute(bm, seq("a", list(range(1, 9))))  # exactly 2 blocks
    again = seq("b", list(range(1, 9)))
    assert bm.allocate(again, again.num_tokens) == 4  # the last token's logits must be computed


def test_freed_blocks_stay_cached_until_their_space_is_needed() -> None:
    bm = BlockManager(4, BLOCK)
    first = seq("a", list(range(1, 10)))
    compute(bm, first)
    bm.free(first)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    again = seq("b", list(range(1, 10)))
    assert bm.allocate(again, again.num_tokens) == 8
    bm.free(again)
    # A different prompt that needs the whole pool evicts them.
    other = seq("c", list(range(100, 116)))
    assert bm.allocate(other, other.num_tokens) == 0 and bm.num_cached_blocks == 0


def test_eviction_takes_uncached_blocks_first_then_the_least_recently_used() -> None:
    bm = BlockManager(6, BLOCK)
    old, new = seq("old", list(range(1, 10))), seq("new", list(range(50, 59)))
    compute(bm, old)
    compute(bm, new)
    bm.free(old)
    bm.free(new)  # free list: 2 partial blocks, then old's blocks, then new's
    filler = seq("f", list(range(200, 210)))  # 3 blocks: the 2 uncached ones, then the LRU cached one
    bm.allocate(filler, filler.num_tokens)
    # old was freed first, so its blocks go first, its tail before its head; new's are all still cached.
    assert bm.num_cached_prefix_tokens(seq("old again", list(range(1, 10)))) == 4
    assert bm.num_cached_prefix_tokens(seq("new again", list(range(50, 59)))) == 8


def test_salts_keep_tenants_apart_and_shared_prefixes_bridge_them() -> None:
    bm = BlockManager(32, BLOCK)
    prompt = list(range(1, 14))
    compute(bm, seq("a", prompt, salt="team:a"))
    assert bm.allocate(seq("b", prompt, salt="team:b"), 13) == 0
    assert bm.allocate(seq("a2", prompt, salt="team:a"), 13) == 12
    # With the first 8 tokens marked shared, they are cached for every salt; the rest stays per-team.
    compute(bm, seq("a3", prompt, salt="team:a", shared=8))
    assert bm.allocate(seq("b2", prompt, salt="team:b", shared=8), 13) == 8
    assert bm.allocate(seq("c", prompt[:8] + [77, 78, 79, 80, 81], salt="team:c", shared=8), 13) == 8


def test_prefix_caching_can_be_turned_off() -> None:
    bm = BlockManager(16, BLOCK, enable_prefix_caching=False)
    compute(bm, seq("a", list(range(1, 11))))
    assert bm.allocate(seq("b", list(range(1, 11))), 10) == 0 and bm.num_cached_blocks == 0


def test_allocating_past_the_pool_raises() -> None:
    bm = BlockManager(2, BLOCK)
    s = seq("a", list(range(1, 10)))
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="KV pool exhausted"):
        bm.allocate(s, 9)
    assert bm.num_free_blocks == 2 and s.block_table == []


class BlockManagerMachine(RuleBasedStateMachine):
    """Random operations against a small pool; a simulated KV store checks what each sequence reads."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(12, BLOCK)
        self.slots: dict[int, tuple[str, tuple[int, ...]]] = {}
        """Simulated KV: slot -> (salt it was computed under, the whole prefix up to and including it)."""
        self.sequences: list[Sequence] = []
        self.count = 0

    def _new(self, tokens: list[int], salt: str, shared: int) -> Sequence | None:
        self.count += 1
        s = seq(f"s{self.count}", tokens, salt, shared)
        if not self.bm.can_allocate(s, s.num_tokens):
            return None
        self.bm.allocate(s, s.num_tokens)
        self._compute(s)
        self.sequences.append(s)
        return s

    def _compute(self, s: Sequence) -> None:
        for pos in range(s.num_computed_tokens, s.num_tokens):
            slot = s.block_table[pos // BLOCK] * BLOCK + pos % BLOCK
            salt = SHARED_SALT if (pos // BLOCK + 1) * BLOCK <= s.num_shared_prefix_tokens else s.cache_salt
            self.slots[slot] = (salt, tuple(s.token_ids[: pos + 1]))
        s.num_computed_tokens = s.num_tokens
        self.bm.commit(s)

    @rule(tokens=st.lists(st.integers(1, 3), min_size=1, max_size=14),
          salt=st.sampled_from(["", "team:a", "team:b"]), shared=st.integers(0, 8))
    def allocate(self, tokens: list[int], salt: str, shared: int) -> None:
        self._new(tokens, salt, min(shared, len(tokens)))

    @precondition(lambda self: self.sequences)
    @rule(index=st.integers(0, 100), extra=st.lists(st.integers(1, 3), max_size=6),
          salt=st.sampled_from(["", "team:a", "team:b"]))
    def fork_by_prefix(self, index: int, extra: list[int], salt: str) -> None:
        parent = self.sequences[index % len(self.sequences)]
        cut = max(1, parent.num_tokens - len(extra))
        self._new(parent.token_ids[:cut] + extra, salt, 0)

    @precondition(lambda self: self.sequences)
    @rule(index=st.integers(0, 100), token=st.integers(1, 3))
    def append(self, index: int, token: int) -> None:
        s = self.sequences[index % len(self.sequences)]
        if s.num_tokens >= 40 or not self.bm.can_allocate(s, s.num_tokens + 1):
            return
        s.append_token(token)
        self.bm.allocate(s, s.num_tokens)
        self._compute(s)

    @precondition(lambda self: self.sequences)
    @rule(index=st.integers(0, 100))
    def free(self, index: int) -> None:
        s = self.sequences.pop(index % len(self.sequences))
        self.bm.free(s)

    @precondition(lambda self: self.sequences)
    @rule(index=st.integers(0, 100))
    def preempt_and_resume(self, index: int) -> None:
        s = self.sequences[index % len(self.sequences)]
        self.bm.free(s)
        s.num_computed_tokens = 0
        if self.bm.can_allocate(s, s.num_tokens):
            self.bm.allocate(s, s.num_tokens)  # takes back whatever is still cached
            self._compute(s)
        else:
            self.sequences.remove(s)

    @invariant()
    def books_balance(self) -> None:
        bm = self.bm
        holders: dict[int, int] = {}
        for s in self.sequences:
            assert len(set(s.block_table)) == len(s.block_table), "a block is twice in one table"
            for block_id in s.block_table:
                holders[block_id] = holders.get(block_id, 0) + 1
        for block in bm.blocks:
            assert block.ref_count >= 0
            assert block.ref_count == holders.get(block.block_id, 0), "ref count differs from its holders"
            assert (block.ref_count == 0) == (block.block_id in bm._free)
            if block.hash is None:
                assert holders.get(block.block_id, 0) <= 1, "an uncached block is shared"
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_used_blocks == len(holders)
        for hash_, block_id in bm._cached.items():
            assert bm.blocks[block_id].hash == hash_

    @invariant()
    def every_sequence_reads_its_own_kv(self) -> None:
        for s in self.sequences:
            for pos in range(s.num_computed_tokens):
                salt, prefix = self.slots[s.block_table[pos // BLOCK] * BLOCK + pos % BLOCK]
                assert prefix == tuple(s.token_ids[: pos + 1]), "a sequence reads another prefix's KV"
                assert salt in (s.cache_salt, SHARED_SALT), "a sequence reads another tenant's KV"

    def teardown(self) -> None:
        for s in self.sequences:
            self.bm.free(s)
        assert self.bm.num_free_blocks == self.bm.num_blocks, "the pool leaked blocks"
        assert all(block.ref_count == 0 for block in self.bm.blocks)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_properties = BlockManagerMachine.TestCase
