"""Prefix homes shared by a model's gateway replicas through Redis.

Without it each replica homes a new prefix on the worker its own view finds roomiest, so N
replicas can give one prefix up to N homes, and each worker's cache holds more prefixes than
it has room for. With it, the first replica to see a prefix claims its home in Redis, and the
others adopt that home:

  fw:{routing:<model>}:homes   hash: prefix digest -> "<worker>\\t<prefix tokens>"
  fw:{routing:<model>}:used    sorted set: prefix digest -> when a replica last claimed it (unix s)
  fw:{routing:<model>}:held    hash: worker -> tokens of the prefixes homed on it

A claim is one atomic script: a home whose worker is still among the caller's candidates
stands; otherwise the candidate with the most room (1 - held / KV capacity, ties in the
caller's rendezvous order) becomes the home. A prefix no replica has claimed for `max_idle_s`
is forgotten (it has left the caches), and so are the least recently claimed past `max_keys`.
The first request a replica sees with a new prefix waits for its claim (batched with the
other Redis calls of that turn; at most half a second, then it goes by the replica's own view);
later requests route at once on the home the replica knows, and a replica re-claims a prefix
it routes at most every `refresh_s` (adopting the answer for the next request), which keeps the
prefixes in use from being forgotten.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from fareway.redis import keys
from fareway.redis.batch import batched_script
from fareway.redis.scripts import lua

DEFAULT_MAX_KEYS = 100_000
DEFAULT_REFRESH_S = 30.0
DEFAULT_MAX_IDLE_S = 600.0

class SharedHomes:
    """One model's prefix homes in Redis (see the module's docstring)."""

    def __init__(self, redis: aioredis.Redis, model: str, max_keys: int = DEFAULT_MAX_KEYS,
                 refresh_s: float = DEFAULT_REFRESH_S, max_idle_s: float = DEFAULT_MAX_IDLE_S) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        if not 0 < refresh_s < max_idle_s:
            raise ValueError(f"refresh_s ({refresh_s}) must be positive and below max_idle_s ({max_idle_s})")
        self._claim = batched_script(redis, lua("prefix_home_claim"))
        self._keys = list(keys.prefix_homes(model))
        self.max_keys = max_keys
        self.refresh_s = refresh_s
        self.max_idle_s = max_idle_s

    def claim(self, key: str, prefix_tokens: int, candidates: Sequence[tuple[str, int]]) -> asyncio.Future[str]:
        """Queues the claim of `key`'s home among `candidates`, (worker name, KV capacity in tokens) in
        rendezvous order; the future has the home's worker name. Call it from the event loop."""
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        now = time.time()
        args: list[str | int] = [digest, prefix_tokens, f"{now:.3f}", self.max_keys, f"{now - self.max_idle_s:.3f}"]
        for name, kv_capacity_tokens in candidates:
            args += [name, kv_capacity_tokens]
        return self._claim(keys=self._keys, args=args)  # type: ignore[return-value]
