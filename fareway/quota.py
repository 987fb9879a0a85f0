"""Quotas: the rules a request is admitted by before it runs, per team and per project.

Two kinds, stored alike (a team's hash: scope -> its rule, where scope is "team" or
"project:<name>") and admitted alike (one atomic Redis script each, sharing the request's round
trip, fareway/redis/batch.py):

- **Limits** (`LimitStore`, `RateLimiter`): requests and tokens per minute, concurrent requests,
  and the fair-share weight and priority that order requests waiting for saturated workers
  (gateway/fairness.py). Requests and tokens per minute are token buckets kept as GCRA (the
  generic cell rate algorithm): a bucket holds a minute's allowance and refills continuously, so
  no window edge lets twice the limit through, and its state is one number. The clock is Redis's
  own (TIME), so every gateway replica agrees on it. Tokens are reserved at admission (a bound on
  the prompt plus max_tokens) and settled to the actual count when the request ends; concurrency
  slots lapse on their own if a gateway dies before releasing them.
- **Budgets** (`Budgets`): monthly spend limits, hard (requests that could pass it are refused)
  and soft (an alert is recorded), on list price or cost to serve. Each request reserves its
  maximum cost at admission, in one atomic check against spent + reserved, and the usage record's
  script (accounting/ledger.py) releases the reservation and adds the actual spend. So concurrent
  requests overshoot a hard budget only by what their actual cost exceeds their reservation, and
  on the list-price basis, where the reservation is a true upper bound, not at all.

A request with a request_id carries its claim (gateway/idempotency.py) into both scripts, which
count it only if the claim is its run's: a replay or a duplicate is neither counted nor charged.

The keys are in fareway/redis/keys.py, the scripts in fareway/redis/lua/.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from fareway.redis import keys
from fareway.redis.batch import batched_script
from fareway.redis.scripts import lua

TEAM_SCOPE = "team"
NO_LIMIT = -1
NANO_USD_PER_USD = 10**9
BASES = ("cost", "list")
"""What a budget counts as spend: cost to serve, or list price."""


def project_scope(project: str) -> str:
    return f"project:{project}"


def scope_of(project: str) -> str:
    """The scope of a rule for `project`; "" is the whole team."""
    return project_scope(project) if project else TEAM_SCOPE


def project_of(scope: str) -> str:
    return "" if scope == TEAM_SCOPE else scope.removeprefix("project:")


def month_of(unix_seconds: float) -> str:
    """The budget period (UTC month, YYYY-MM) of an instant."""
    return _month_of_hour(int(unix_seconds // 3600))


@functools.lru_cache(maxsize=1024)
def _month_of_hour(hour: int) -> str:
    return dt.datetime.fromtimestamp(hour * 3600, dt.UTC).strftime("%Y-%m")


# --- the rules -------------------------------------------------------------------------------------

RATE_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
LIMIT_FIELDS = (*RATE_LIMITS, "weight", "priority")
"""What a Limits entry can set; each may be left out (None)."""
_SHORT = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "max_concurrent_requests": "concurrent"}


MAX_BUDGET_USD = 1e12
"""The largest budget: its nano-dollars must fit Redis's 64-bit integers (9.2e18)."""
MAX_WEIGHT = 1e6
"""The largest fair-share weight (a finite one: service divides by it)."""


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
        if all(getattr(self, name) is None for name in LIMIT_FIELDS):
            raise ValueError("give at least one of requests per minute, tokens per minute, concurrent requests, "
                             "weight or priority")
        for name in RATE_LIMITS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.weight is not None and not 0 < self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be above 0 and at most {MAX_WEIGHT:g}, got {self.weight:g}")

    @property
    def has_rate_limits(self) -> bool:
        return any(getattr(self, name) is not None for name in RATE_LIMITS)

    @property
    def scope(self) -> str:
        return scope_of(self.project)

    def values(self) -> dict[str, int | float | None]:
        """What it sets, by LIMIT_FIELDS name (None: not set)."""
        return {name: getattr(self, name) for name in LIMIT_FIELDS}

    def encode(self) -> str:
        parts = [f"{_SHORT[name]}={_or_none(getattr(self, name))}" for name in RATE_LIMITS]
        if self.weight is not None:
            parts.append(f"weight={self.weight!r}")
        if self.priority is not None:
            parts.append(f"priority={self.priority}")
        return ";".join(parts)

    @classmethod
    def decode(cls, team: str, scope: str, text: str) -> Limits:
        values = dict(part.split("=", 1) for part in text.split(";"))
        limits = (int(values[_SHORT[name]]) for name in RATE_LIMITS)
        return cls(team, project_of(scope), *(None if value < 0 else value for value in limits),
                   weight=float(values["weight"]) if "weight" in values else None,
                   priority=int(values["priority"]) if "priority" in values else None)


def _or_none(value: int | None) -> int:
    return NO_LIMIT if value is None else value


@dataclass(frozen=True)
class Budget:
    team: str
    project: str = ""
    """"" budgets the whole team."""
    hard_usd: float | None = None
    """Monthly limit: requests that could take spend past it are refused. None: no hard limit."""
    soft_usd: float | None = None
    """Monthly threshold that only records an alert. None: none."""
    basis: str = "list"
    """What counts as spend: "list" (list price; reservations are exact upper bounds) or "cost" (cost to serve)."""

    def __post_init__(self) -> None:
        if not self.team:
            raise ValueError("a budget needs a team")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        for name in ("hard_usd", "soft_usd"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_BUDGET_USD:
                raise ValueError(f"{name} must be from 0 to {MAX_BUDGET_USD:g} USD, got {value:g}")
        if self.hard_usd is None and self.soft_usd is None:
            raise ValueError("a budget needs a hard limit, a soft threshold or both")

    @property
    def scope(self) -> str:
        return scope_of(self.project)

    def encode(self) -> str:
        return ";".join((f"hard_nusd={_nusd(self.hard_usd)}", f"soft_nusd={_nusd(self.soft_usd)}",
                         f"basis={self.basis}"))

    @classmethod
    def decode(cls, team: str, scope: str, text: str) -> Budget:
        values = dict(part.split("=", 1) for part in text.split(";"))
        return cls(team, project_of(scope), _usd(int(values["hard_nusd"])), _usd(int(values["soft_nusd"])),
                   values["basis"])


def _nusd(usd: float | None) -> int:
    return -1 if usd is None else round(usd * NANO_USD_PER_USD)


def _usd(nusd: int) -> float | None:
    return None if nusd < 0 else nusd / NANO_USD_PER_USD


# --- where the rules are kept ----------------------------------------------------------------------

Rule = TypeVar("Rule", Limits, Budget)


class _Rules(Generic[Rule]):
    """One kind of rule, per team in a hash of scope -> rule."""

    def __init__(self, redis: aioredis.Redis, key: Callable[[str], str],
                 decode: Callable[[str, str, str], Rule], order: Callable[[Rule], Any]) -> None:
        self._redis = redis
        self._key = key
        self._decode = decode
        self._order = order

    async def set(self, rule: Rule) -> None:
        """Stores the rule, replacing its scope's."""
        await self._redis.hset(self._key(rule.team), rule.scope, rule.encode())

    async def delete(self, team: str, project: str = "") -> bool:
        return bool(await self._redis.hdel(self._key(team), scope_of(project)))

    async def list(self, team: str) -> list[Rule]:
        stored = await self._redis.hgetall(self._key(team))
        return sorted((self._decode(team, scope, text) for scope, text in stored.items()), key=self._order)


class LimitStore(_Rules[Limits]):
    """The limits in Redis, read through a short cache so most requests cost no extra round trip."""

    def __init__(self, redis: aioredis.Redis, cache_ttl_s: float = 5.0) -> None:
        super().__init__(redis, keys.limits, Limits.decode, lambda x: x.project)
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, dict[str, Limits]]] = {}

    async def update(self, team: str, project: str, changes: Mapping[str, int | float | None]) -> Limits:
        """Applies `changes` (LIMIT_FIELDS names: a value sets it, None clears it) to the scope's
        limits and leaves what they do not name as it was; returns the result. Atomic against
        concurrent updates (WATCH)."""
        if unknown := sorted(set(changes) - set(LIMIT_FIELDS)):
            raise ValueError(f"unknown limits {', '.join(unknown)}; limits are {', '.join(LIMIT_FIELDS)}")
        key, scope = keys.limits(team), scope_of(project)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    stored = await pipe.hget(key, scope)
                    current = Limits.decode(team, scope, stored).values() if stored is not None else {}
                    limits = Limits(team, project, **(current | dict(changes)))  # type: ignore[arg-type]
                    pipe.multi()
                    pipe.hset(key, scope, limits.encode())
                    await pipe.execute()
                    return limits
                except redis.exceptions.WatchError:
                    continue  # changed meanwhile: apply the changes to what is there now

    async def teams(self) -> list[str]:
        """Teams with limits set (a SCAN: for the admin's listing, not the request path)."""
        return sorted({keys.team_of(key) async for key in self._redis.scan_iter(match=keys.LIMITS_PATTERN,
                                                                                 count=1000)})

    async def for_tenant(self, team: str, project: str) -> list[Limits]:
        """The limits that apply to a request of team/project: the team's, then the project's."""
        cached = self._cache.get(team)
        if cached is None or time.monotonic() - cached[0] > self.cache_ttl_s:
            by_scope = {limits.scope: limits for limits in await self.list(team)}
            cached = (time.monotonic(), by_scope)
            self._cache[team] = cached
        return [limits for scope in (TEAM_SCOPE, project_scope(project)) if (limits := cached[1].get(scope))]


# --- admitting requests against limits ---------------------------------------------------------------

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


class RateLimiter:
    """Admits requests against their limits and settles them when they end."""

    def __init__(self, redis: aioredis.Redis, slot_lease_s: float = 900.0) -> None:
        self.slot_lease_s = slot_lease_s
        """How long a concurrency slot lasts if its gateway never releases it (it died)."""
        self._admit = batched_script(redis, lua("clock", "limits_admit"))
        self._settle = batched_script(redis, lua("clock", "limits_settle"))

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
        script_keys = _limit_keys(team, [x.scope for x in limits])
        if claim is not None:
            script_keys.append(claim[0])
        result = await self._admit(keys=script_keys, args=args)
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
        """`settle`, with its script queued at once (fareway/redis/batch.py). Await what it returns."""
        if hold.settled or not (hold.tokens or hold.slots):
            hold.settled = True
            return _settled(None)
        hold.settled = True
        scopes = sorted(set(hold.tokens) | set(hold.slots))
        args: list[str | int] = [hold.request_id, "" if now_us is None else now_us]
        for scope in scopes:
            reserved, tpm = hold.tokens.get(scope, (0, 0))
            args += [scope, actual_tokens - reserved if tpm else 0, tpm, int(scope in hold.slots)]
        return _settled(self._settle(keys=_limit_keys(hold.team, scopes), args=args))


async def _settled(settling: Awaitable[Any] | None) -> None:
    if settling is not None:
        await settling


def _limit_keys(team: str, scopes: list[str]) -> list[str]:
    project = next((scope for scope in scopes if scope != TEAM_SCOPE), project_scope(""))
    return [keys.rate(team), keys.inflight(team, TEAM_SCOPE), keys.inflight(team, project)]


# --- budgets -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reservation:
    """A request's maximum cost, held against its team's and project's budgets while it runs."""

    month: str
    """The budget period the reservation was taken in; "" when no budget applied and nothing was held."""
    field: str


@dataclass(frozen=True)
class Refusal:
    scope: str
    hard_nusd: int
    spent_nusd: int
    reserved_nusd: int
    basis: str


class BudgetRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.scope)
        self.refusal = refusal


def spend_field(scope: str, basis: str) -> str:
    """The spend hash's field of a scope's spend on a basis ("team:list", "project:ads:cost")."""
    return f"{scope}:{basis}"


def reserved_field(scope: str, basis: str) -> str:
    """The spend hash's field of what running requests hold against a scope's budget."""
    return f"{scope}:reserved_{basis}"


def reservation_field(project: str, request_id: str) -> str:
    """A request's entry in its team's reservations."""
    return f"{project}:{request_id}"


class Budgets(_Rules[Budget]):
    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis, keys.budgets, Budget.decode, lambda b: (b.project, b.basis))
        self._reserve = batched_script(redis, lua("budget_reserve"))
        self._release = batched_script(redis, lua("reservation", "budget_release"))

    async def spend(self, team: str, month: str) -> dict[str, int]:
        """The month's counters: spend_field and reserved_field names -> nano-dollars."""
        return {k: int(v) for k, v in (await self._redis.hgetall(keys.spend(team, month))).items()
                if not k.endswith(":soft_alerted")}

    async def reserve(self, team: str, project: str, request_id: str, *, max_cost_nusd: int,
                      max_list_nusd: int, now: float | None = None) -> Reservation:
        """Holds the request's maximum cost against the team's and project's budgets.

        Raises BudgetRefused if a hard limit would be passed; returns a
        Reservation with an empty month when no budget applies.
        """
        reservation = await self.reserve_soon(team, project, request_id, max_cost_nusd=max_cost_nusd,
                                              max_list_nusd=max_list_nusd, now=now)
        assert reservation is not None  # only a claimed reservation can be skipped
        return reservation

    def reserve_soon(self, team: str, project: str, request_id: str, *, max_cost_nusd: int,
                     max_list_nusd: int, now: float | None = None,
                     claim: tuple[str, str] | None = None) -> Coroutine[Any, Any, Reservation | None]:
        """`reserve`, with its script queued at once (fareway/redis/batch.py): calls queued after it in
        the same turn of the loop share its round trip. Await what it returns.

        With `claim` (the key of the request_id's claim, and this run's owner token), nothing is held
        unless the claim, queued ahead of this, is this run's: None then."""
        now = time.time() if now is None else now
        month = month_of(now)
        entry = reservation_field(project, request_id)
        script_keys = [keys.budgets(team), keys.spend(team, month), keys.reservations(team), keys.alerts(team)]
        if claim is not None:
            script_keys.append(claim[0])
        result = self._reserve(keys=script_keys, args=[entry, project_scope(project), max_cost_nusd, max_list_nusd,
                                                       f"{now:.3f}", month, claim[1] if claim else ""])
        return _reserved(result, month, entry)

    async def release(self, team: str, reservation: Reservation) -> bool:
        """Returns a reservation whose request never ran (so no usage record will settle it)."""
        if not reservation.month:
            return False
        return bool(await self._release(keys=[keys.reservations(team), keys.spend(team, reservation.month)],
                                        args=[reservation.field]))

    async def release_stale(self, team: str, max_age_s: float, now: float | None = None) -> int:
        """Releases reservations older than max_age_s: their gateway died before recording the
        request, and they would otherwise hold the budget for ever. Returns how many."""
        now = time.time() if now is None else now
        released = 0
        for entry, value in (await self._redis.hgetall(keys.reservations(team))).items():
            parts = dict(part.split("=", 1) for part in value.split(";"))
            if now - float(parts.get("at", now)) > max_age_s and "month" in parts:
                released += await self.release(team, Reservation(parts["month"], entry))
        return released

    async def alerts(self, team: str) -> list[dict[str, str]]:
        return [values for _, values in await self._redis.xrange(keys.alerts(team))]


async def _reserved(result: Awaitable[list[Any]], month: str, entry: str) -> Reservation | None:
    """What the reservation script answered, as a Reservation, a BudgetRefused, or None (another run's
    claim: nothing held)."""
    answer = await result
    if int(answer[0]) == 3:
        return None
    if int(answer[0]) == 0:
        _, scope, hard, spent, reserved, basis = answer
        raise BudgetRefused(Refusal(scope, int(hard), int(spent), int(reserved), basis))
    return Reservation(month if int(answer[0]) == 1 else "", entry)

