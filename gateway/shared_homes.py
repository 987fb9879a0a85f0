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
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from fareway.redis_batch import batched_script

if TYPE_CHECKING:
    from gateway.routing import Routable

DEFAULT_MAX_KEYS = 100_000
DEFAULT_REFRESH_S = 30.0
DEFAULT_MAX_IDLE_S = 600.0

# KEYS: homes, used, held. ARGV: digest, prefix tokens, now, max keys, idle cutoff (unix s), then the
# candidates in rendezvous order as (name, KV capacity in tokens) pairs. Returns the home's worker name.
_CLAIM_SCRIPT = r"""
local homes, used, held = KEYS[1], KEYS[2], KEYS[3]
local digest, tokens, now, max_keys = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local function forget(oldest)
  local gone = redis.call('HGET', homes, oldest)
  if gone then
    local worker, homed = string.match(gone, '^(.*)\t(%d+)$')
    redis.call('HINCRBY', held, worker, -tonumber(homed))
    redis.call('HDEL', homes, oldest)
  end
  redis.call('ZREM', used, oldest)
end
-- Prefixes no replica has claimed for a while have left the caches: a few at a time, oldest first.
for _, idle in ipairs(redis.call('ZRANGEBYSCORE', used, '-inf', ARGV[5], 'LIMIT', 0, 8)) do
  forget(idle)
end
local home = redis.call('HGET', homes, digest)
if home then
  local worker = string.match(home, '^(.*)\t')
  for i = 6, #ARGV, 2 do
    if ARGV[i] == worker then
      redis.call('ZADD', used, now, digest)
      return worker
    end
  end
  forget(digest)
end
local best, best_room
for i = 6, #ARGV, 2 do
  local capacity = tonumber(ARGV[i + 1])
  local homed = tonumber(redis.call('HGET', held, ARGV[i]) or '0')
  local room = -homed
  if capacity > 0 then room = 1 - homed / capacity end
  if best_room == nil or room > best_room then best, best_room = ARGV[i], room end
end
redis.call('HSET', homes, digest, best .. '\t' .. tokens)
redis.call('HINCRBY', held, best, tokens)
redis.call('ZADD', used, now, digest)
while redis.call('ZCARD', used) > max_keys do
  forget(redis.call('ZRANGE', used, 0, 0)[1])
end
return best
"""


def homes_keys(model: str) -> list[str]:
    prefix = f"fw:{{routing:{model}}}:"
    return [prefix + "homes", prefix + "used", prefix + "held"]


class SharedHomes:
    """One model's prefix homes in Redis (see the module's docstring)."""

    def __init__(self, redis: aioredis.Redis, model: str, max_keys: int = DEFAULT_MAX_KEYS,
                 refresh_s: float = DEFAULT_REFRESH_S, max_idle_s: float = DEFAULT_MAX_IDLE_S) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        if not 0 < refresh_s < max_idle_s:
            raise ValueError(f"refresh_s ({refresh_s}) must be positive and below max_idle_s ({max_idle_s})")
        self._claim = batched_script(redis, _CLAIM_SCRIPT)
        self._keys = homes_keys(model)
        self.max_keys = max_keys
        self.refresh_s = refresh_s
        self.max_idle_s = max_idle_s

    def claim(self, key: str, prefix_tokens: int, candidates: Sequence[Routable]) -> asyncio.Future[str]:
        """Queues the claim of `key`'s home among `candidates` (in rendezvous order); the future has
        the home's worker name. Call it from the event loop."""
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        now = time.time()
        args: list[str | int] = [digest, prefix_tokens, f"{now:.3f}", self.max_keys, f"{now - self.max_idle_s:.3f}"]
        for worker in candidates:
            args += [worker.name, worker.kv_capacity_tokens]
        return self._claim(keys=self._keys, args=args)  # type: ignore[return-value]
