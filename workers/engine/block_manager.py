"""Paged KV-cache blocks: a fixed pool of equal blocks handed to sequences.

A sequence's block table lists its blocks in order; token i of the sequence
lives in block table[i // block_size] at offset i % block_size.
"""

from __future__ import annotations

from collections import deque

from workers.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the pool can grow the sequence's table to hold num_tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows the sequence's block table to hold num_tokens."""
        if not self.can_allocate(seq, num_tokens):
            raise RuntimeError(f"KV pool exhausted: {seq.request_id} needs "
                               f"{self.blocks_for(num_tokens) - len(seq.block_table)} blocks, {len(self._free)} free")
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
