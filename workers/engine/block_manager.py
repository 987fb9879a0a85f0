"""Paged KV-cache blocks with automatic prefix caching.

The pool is a fixed number of equal blocks. A sequence's block table lists its
blocks in order; token i of the sequence lives in block table[i // block_size]
at offset i % block_size.

Prefix caching: once a block is full and its K and V are computed, it is
registered under a hash chained over every token before it (each block's hash
covers the previous block's hash, its salt and its own tokens), so equal
hashes mean equal prefixes. A new sequence takes every leading block whose
hash is registered instead of computing it. Blocks are reference-counted;
a block nobody holds goes back to the free list but keeps its contents and
hash, so a later request can still take it back. The free list is in
least-recently-used order, and a cached block is evicted (its hash forgotten)
only when its slot is needed for new tokens.

The salt scopes reuse: a block hashed with one tenant's salt never matches
another tenant's request. Blocks inside a prefix that an operator marked as
shared are hashed with the shared salt instead, so every tenant reuses them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass

from workers.engine.sequence import Sequence

SHARED_SALT = "\x00shared"
"""The salt of blocks inside an operator-marked shared prefix (no tenant's salt can equal it)."""


def block_hash(parent: bytes | None, salt: str, token_ids: TokenIds[int]) -> bytes:
    """The hash of a full block: covers its parent's hash (the whole prefix), the salt and its tokens.

    128-bit BLAKE2b, so two different prefixes sharing a hash is not a
    practical concern; block contents are therefore not compared on a hit.
    """
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(salt.encode())
    digest.update(b"\x00")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    """Set once the block is full and its KV computed; kept after it is freed, until it is evicted."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks nobody holds, least recently used first: allocation takes from the front.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        """Hash -> the block holding that prefix's KV (held or free)."""

    # -- figures ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached ones included (they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose KV can be reused by a new request with the same prefix."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix lookup -----------------------------------------------------------

    def _salt(self, seq: Sequence, block_index: int) -> str:
        in_shared_prefix = (block_index + 1) * self.block_size <= seq.num_shared_prefix_tokens
        return SHARED_SALT if in_shared_prefix else seq.cache_salt

    def _hash_of(self, seq: Sequence, block_index: int, parent: bytes | None) -> bytes:
        start = block_index * self.block_size
        return block_hash(parent, self._salt(seq, block_index), seq.token_ids[start:start + self.block_size])

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """(block id, hash) of the sequence's leading blocks already in the cache.

        At least the last token is always left to compute: the step that
        computes it produces the logits of the next token.
        """
        if not self.enable_prefix_caching or seq.block_table or _wants_prompt_logprobs(seq):
            return []
        hits: list[tuple[int, bytes]] = []
        parent: bytes | None = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            parent = self._hash_of(seq, index, parent)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append((block_id, parent))
        return hits

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Leading tokens of a sequence not yet allocated that the cache would serve now."""
        return len(self._cached_prefix(seq)) * self.block_size

    # -- allocation --------------------------------------------------------------

    def _num_new_blocks(self, seq: Sequence, num_tokens: int, hits: list[tuple[int, bytes]]) -> int:
        """Free blocks that growing the sequence to num_tokens would take from the pool."""
        held_hits = sum(1 for block_id, _ in hits if self.blocks[block_id].ref_count > 0)
        return self.blocks_for(num_tokens) - len(seq.block_table) - held_hits

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the pool can grow the sequence's table to hold num_tokens (cached prefix blocks reused)."""
        return self._num_new_blocks(seq, num_tokens, self._cached_prefix(seq)) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> int:
        """Grows the sequence's block table to hold num_tokens; returns the prefix tokens taken from the cache.

        On a sequence's first allocation its leading cached blocks are reused
        and counted as computed (seq.num_computed_tokens moves past them).
        """
        hits = self._cached_prefix(seq)
        needed = self._num_new_blocks(seq, num_tokens, hits)
        if needed > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {seq.request_id} needs {needed} blocks, {len(self._free)} free")
        for block_id, hash_ in hits:
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(hash_)
        cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = max(seq.num_computed_tokens, cached_tokens)
        while len(seq.block_table) < self.blocks_for(num_tokens):
            block_id = next(iter(self._free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        return cached_tokens

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        """Forgets a free block's cached prefix, so its slot can hold new tokens."""
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
        block.hash = None

    def commit(self, seq: Sequence) -> None:
        """Registers the sequence's blocks that are now full and computed, so later requests can reuse them."""
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for index in range(len(seq.block_hashes), num_full):
            parent = self._hash_of(seq, index, parent)
            seq.block_hashes.append(parent)
            if not self.enable_prefix_caching or parent in self._cached:
                continue  # another sequence computed the same prefix first: that copy stays the cached one
            block = self.blocks[seq.block_table[index]]
            block.hash = parent
            self._cached[parent] = block.block_id

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None | bool:
        """Gives `child` (a sample of the same prompt, with the same tokens so far) the parent's KV: its
        full blocks shared (reference-counted), and its last block, when partial, copied into a free
        block, since both will write their next tokens there. Returns the copy (source, destination)
        for the runner to make before the next forward pass, None when every block is shared, or False
        when no block is free for the copy (the child then gets nothing and is recomputed: its prefix
        from the cache)."""
        num_full = parent.num_computed_tokens // self.block_size
        partial = len(parent.block_table) > num_full
        if partial and not self._free:
            return False
        for block_id in parent.block_table[:num_full]:
            self._take(block_id)
        child.block_table = parent.block_table[:num_full]
        child.block_hashes = parent.block_hashes[:num_full]
        child.num_computed_tokens = parent.num_computed_tokens
        if not partial:
            return None
        block_id = next(iter(self._free))
        self._evict(block_id)
        self._take(block_id)
        child.block_table.append(block_id)
        return parent.block_table[num_full], block_id

    def free(self, seq: Sequence) -> None:
        """Releases the sequence's blocks. Cached blocks keep their KV for reuse; the
        sequence's last blocks go first in line for eviction, its first blocks (the
        prefix most likely to be shared) last."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self._free[block_id] = None
            if block.hash is None:
                self._free.move_to_end(block_id, last=False)  # holds nothing reusable: use it first
        seq.block_table = []
        seq.block_hashes = []


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    """Its prompt's logprobs are still to compute: the cache cannot serve it, since it has no logits."""
    return seq.sampling.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1
