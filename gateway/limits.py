"""Rate and concurrency limits per team and per project, shared by every gateway replica.

Each admission is one atomic Redis script over the team's keys:
  fw:{team}:limits            <scope> -> "rpm=N;tpm=N;concurrent=N[;weight=W][;priority=P]" (-1: no limit)
  fw:{team}:rate              <scope>:rpm, <scope>:tpm -> theoretical arrival time, in microseconds
  fw:{team}:inflight:<scope>  sorted set: request id -> when its slot lapses (microseconds)
where <scope> is "team" or "project:<name>".

Requests and tokens per minute are token buckets kept as GCRA (the generic
cell rate algorithm): a bucket holds a minute's allowance and refills
continuously, so no window edge lets twice the limit through, and the state
is one number per bucket. The clock is Redis's own (TIME), so every replica
agrees on it. Tokens are reserved at admission (a bound on the prompt plus
max_tokens) and settled to the actual count when the request ends; concurrency
slots lapse on their own if a gateway dies before releasing them.

The same entry carries the scope's fair-share weight and priority, which order
requests waiting for saturated workers (gateway/fairness.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from fareway.redis_batch import batched_script

TEAM_SCOPE = "team"
NO_LIMIT = -1
_US_PER_MINUTE = 60_000_000
_LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
_SHORT = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "max_concurrent_requests": "concurrent"}


def limits_key(team: str) -> str:
    return f"fw:{{{team}}}:limits"


def rate_key(team: str) -> str:
    return f"fw:{{{team}}}:rate"


def inflight_key(team: str, scope: str) -> str:
    return f"fw:{{{team}}}:inflight:{scope}"


def project_scope(project: str) -> str:
    return f"project:{project}"


@dataclass(frozen=True)
class Limits:
    team: str
    project: str = ""
    """"" limits the whole team (all its projects together)."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Prompt plus completion tokens."""
    max_concurrent_requests: int | None = None
    weight: float | None = None
    """Share of saturated workers relative to other tenants of the same priority (None: 1)."""
    priority: int | None = None
    """Waiting requests of a higher priority run first (None: 0)."""

    def __post_init__(self) -> None:
        if not self.team:
            raise ValueError("limits need a team")
        values = [getattr(self, name) for name in _LIMIT_NAMES]
        if all(v is None for v in values) and self.weight is None and self.priority is None:
            raise ValueError("give at least one of requests per minute, tokens per minute, concurrent requests, "
                             "weight or priority")
        for name, value in zip(_LIMIT_NAMES, values, strict=True):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"weight must be positive, got {self.weight}")

    @property
    def has_rate_limits(self) -> bool:
        return any(getattr(self, name) is not None for name in _LIMIT_NAMES)

    @property
    def scope(self) -> str:
        return project_scope(self.project) if self.project else TEAM_SCOPE

    def encode(self) -> str:
        parts = [f"{_SHORT[name]}={_or_none(getattr(self, name))}" for name in _LIMIT_NAMES]
        if self.weight is not None:
            parts.append(f"weight={self.weight!r}")
        if self.priority is not None:
            parts.append(f"priority={self.priority}")
        return ";".join(parts)

    @classmethod
    def decode(cls, team: str, scope: str, text: str) -> Limits:
        values = dict(part.split("=", 1) for part in text.split(";"))
        limits = (int(values[_SHORT[name]]) for name in _LIMIT_NAMES)
        return cls(team, scope.removeprefix("project:") if scope != TEAM_SCOPE else "",
                   *(None if value < 0 else value for value in limits),
                   weight=float(values["weight"]) if "weight" in values else None,
                   priority=int(values["priority"]) if "priority" in values else None)


def _or_none(value: int | None) -> int:
    return NO_LIMIT if value is None else value


@dataclass(frozen=True)
class Exceeded:
    """Why a request was refused: which scope's which limit, and when a retry can pass."""

    scope: str
    limit: str
    """"rpm", "tpm", "concurrent" or "tpm_request" (one request needs more than a minute's tokens)."""
    value: int
    retry_after_s: float | None


@dataclass
class Hold:
    """What an admitted request holds until it is settled."""

    team: str
    request_id: str
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)
    """scope -> (tokens reserved, tokens_per_minute at admission)."""
    slots: list[str] = field(default_factory=list)
    """Scopes whose concurrency slot the request holds."""
    settled: bool = False
    """True once its settlement is queued (settle_soon): it is never settled twice."""


class LimitsExceeded(Exception):
    def __init__(self, exceeded: Exceeded) -> None:
        super().__init__(f"{exceeded.scope} {exceeded.limit}")
        self.exceeded = exceeded


# KEYS: 1 rate, 2 team in-flight set, 3 project in-flight set, 4 the request_id's claim (optional)
# ARGV: 1 request id, 2 tokens, 3 slot lease (us), 4 now (us; "" reads Redis's clock),
#       5 the claim's owner ("": no claim; a claim another run owns: nothing counted, {2}),
#       then per scope (one or two: the team, the project): name, rpm, tpm, concurrent (-1: none)
_ADMIT_SCRIPT = """
if ARGV[5] ~= '' and redis.call('HGET', KEYS[4], 'owner') ~= ARGV[5] then
  return {2}
end
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tokens = tonumber(ARGV[2])
local minute = 60000000
-- Times are doubles: allow the rounding of a long burst's sums (a millisecond's early admission at most).
local slack = 1000
local writes = {}
for i = 6, #ARGV, 4 do
  local scope, rpm, tpm, concurrent = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  for _, bucket in ipairs({{'rpm', rpm, 1}, {'tpm', tpm, tokens}}) do
    local name, limit, cost = bucket[1], bucket[2], bucket[3]
    if limit > 0 then
      if cost > limit then
        return {0, scope, 'tpm_request', tostring(limit), '-1'}
      end
      local interval = minute / limit
      local tat = math.max(tonumber(redis.call('HGET', KEYS[1], scope .. ':' .. name) or '0'), now)
      local new_tat = tat + cost * interval
      if new_tat - now > minute + slack then
        return {0, scope, name, tostring(limit), string.format('%.0f', math.max(new_tat - now - minute, 1))}
      end
      table.insert(writes, {scope .. ':' .. name, new_tat})
    end
  end
  if concurrent > 0 then
    local set = scope == 'team' and KEYS[2] or KEYS[3]
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
    if redis.call('ZCARD', set) >= concurrent then
      return {0, scope, 'concurrent', tostring(concurrent), '1000000'}
    end
    table.insert(writes, {set})
  end
end
for _, w in ipairs(writes) do
  if w[2] then
    redis.call('HSET', KEYS[1], w[1], string.format('%.17g', w[2]))
  else
    redis.call('ZADD', w[1], now + tonumber(ARGV[3]), ARGV[1])
  end
end
return {1}
"""

# KEYS: 1 rate, 2 team in-flight set, 3 project in-flight set
# ARGV: 1 request id, 2 now (us; "" reads Redis's clock), then per scope (one or two):
#       name, token correction (actual - reserved), tpm at admission (0: none), holds a slot (0/1)
_SETTLE_SCRIPT = """
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
for i = 3, #ARGV, 4 do
  local scope, correction, tpm, slot = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
  if tpm > 0 and correction ~= 0 then
    local field = scope .. ':tpm'
    local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    -- A refund cannot fill the bucket past full; an overrun is a debt later requests wait out.
    tat = math.max(tat + correction * 60000000 / tpm, now)
    redis.call('HSET', KEYS[1], field, string.format('%.17g', tat))
  end
  if slot == '1' then
    redis.call('ZREM', scope == 'team' and KEYS[2] or KEYS[3], ARGV[1])
  end
end
return 1
"""


class LimitStore:
    """The limits in Redis, read through a short cache so most requests cost no extra round trip."""

    def __init__(self, redis: aioredis.Redis, cache_ttl_s: float = 5.0) -> None:
        self._redis = redis
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, dict[str, Limits]]] = {}

    async def set(self, limits: Limits) -> None:
        await self._redis.hset(limits_key(limits.team), limits.scope, limits.encode())

    async def delete(self, team: str, project: str = "") -> bool:
        return bool(await self._redis.hdel(limits_key(team), project_scope(project) if project else TEAM_SCOPE))

    async def list(self, team: str) -> list[Limits]:
        stored = await self._redis.hgetall(limits_key(team))
        return sorted((Limits.decode(team, scope, text) for scope, text in stored.items()), key=lambda x: x.project)

    async def teams(self) -> list[str]:
        """Teams with limits set (a SCAN: for the admin's listing, not the request path)."""
        return sorted({key.split("{", 1)[1].split("}", 1)[0]
                       async for key in self._redis.scan_iter(match="fw:{*}:limits", count=1000)})

    async def for_tenant(self, team: str, project: str) -> list[Limits]:
        """The limits that apply to a request of team/project: the team's, then the project's."""
        cached = self._cache.get(team)
        if cached is None or time.monotonic() - cached[0] > self.cache_ttl_s:
            by_scope = {limits.scope: limits for limits in await self.list(team)}
            cached = (time.monotonic(), by_scope)
            self._cache[team] = cached
        return [limits for scope in (TEAM_SCOPE, project_scope(project)) if (limits := cached[1].get(scope))]


class RateLimiter:
    """Admits requests against their limits and settles them when they end."""

    def __init__(self, redis: aioredis.Redis, slot_lease_s: float = 900.0) -> None:
        self.slot_lease_s = slot_lease_s
        """How long a concurrency slot lasts if its gateway never releases it (it died)."""
        self._admit = batched_script(redis, _ADMIT_SCRIPT)
        self._settle = batched_script(redis, _SETTLE_SCRIPT)

    async def admit(self, team: str, request_id: str, limits: list[Limits], tokens: int, *,
                    lease_s: float | None = None, now_us: int | None = None,
                    claim: tuple[str, str] | None = None) -> Hold | None:
        """Counts one request and reserves `tokens` in every applicable bucket, or none of them.

        Raises LimitsExceeded naming the first limit the request would pass. With `claim` (the key of
        the request_id's claim, and this run's owner token), counts nothing (None) unless the claim,
        queued ahead of this, is this run's.
        """
        hold = Hold(team, request_id)
        if not limits:
            return hold
        args: list[str | int] = [request_id, tokens, round((lease_s or self.slot_lease_s) * 1e6),
                                 "" if now_us is None else now_us, claim[1] if claim else ""]
        for limits_ in limits:
            args += [limits_.scope, _or_none(limits_.requests_per_minute), _or_none(limits_.tokens_per_minute),
                     _or_none(limits_.max_concurrent_requests)]
        keys = _keys(team, [x.scope for x in limits])
        if claim is not None:
            keys.append(claim[0])
        result = await self._admit(keys=keys, args=args)
        if int(result[0]) == 2:
            return None
        if int(result[0]) == 0:
            _, scope, limit, value, retry_us = result
            retry = int(retry_us)
            raise LimitsExceeded(Exceeded(scope, limit, int(value), None if retry < 0 else retry / 1e6))
        for limits_ in limits:
            if limits_.tokens_per_minute:
                hold.tokens[limits_.scope] = (tokens, limits_.tokens_per_minute)
            if limits_.max_concurrent_requests:
                hold.slots.append(limits_.scope)
        return hold

    async def settle(self, hold: Hold, actual_tokens: int, *, now_us: int | None = None) -> None:
        """Corrects the reserved tokens to the actual count and frees the concurrency slots (once)."""
        await self.settle_soon(hold, actual_tokens, now_us=now_us)

    def settle_soon(self, hold: Hold, actual_tokens: int, *,
                    now_us: int | None = None) -> Coroutine[Any, Any, None]:
        """`settle`, with its script queued at once (fareway/redis_batch.py). Await what it returns."""
        if hold.settled or not (hold.tokens or hold.slots):
            hold.settled = True
            return _settled(None)
        hold.settled = True
        scopes = sorted(set(hold.tokens) | set(hold.slots))
        args: list[str | int] = [hold.request_id, "" if now_us is None else now_us]
        for scope in scopes:
            reserved, tpm = hold.tokens.get(scope, (0, 0))
            args += [scope, actual_tokens - reserved if tpm else 0, tpm, int(scope in hold.slots)]
        return _settled(self._settle(keys=_keys(hold.team, scopes), args=args))


async def _settled(settling: Awaitable[Any] | None) -> None:
    if settling is not None:
        await settling


def _keys(team: str, scopes: list[str]) -> list[str]:
    project = next((scope for scope in scopes if scope != TEAM_SCOPE), project_scope(""))
    return [rate_key(team), inflight_key(team, TEAM_SCOPE), inflight_key(team, project)]
