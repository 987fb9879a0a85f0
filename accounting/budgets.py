"""Monthly spend budgets per team and per project, with soft and hard limits.

Spend moves in the same atomic script as the usage record (accounting/ledger.py):
  fw:{team}:spend:<YYYY-MM>   <scope>:<basis> -> nano-dollars spent this month
                              <scope>:reserved_<basis> -> held by requests still running
  fw:{team}:budgets           <scope> -> the scope's limits
  fw:{team}:reservations      <project>:<request> -> what the request holds
  fw:{team}:alerts            a stream of soft-limit crossings
where <scope> is "team" or "project:<name>" and <basis> is "cost" (cost to
serve) or "list" (list price).

A hard budget cannot be bypassed by a burst of concurrent requests: each
request reserves its maximum cost at admission, in one atomic check against
spent + reserved, and the reservation is released when its usage is recorded.
Requests run concurrently can therefore overshoot the limit only by what
their actual cost exceeds their reservation, and with the list-price basis
the reservation is a true upper bound, so they cannot overshoot at all.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from accounting.pricebook import NANO_USD_PER_USD
from accounting.records import UsageRecord
from fareway.redis_batch import batched_script

BASES = ("cost", "list")
TEAM_SCOPE = "team"


def spend_key(team: str, month: str) -> str:
    return f"fw:{{{team}}}:spend:{month}"


def budgets_key(team: str) -> str:
    return f"fw:{{{team}}}:budgets"


def reservations_key(team: str) -> str:
    return f"fw:{{{team}}}:reservations"


def alerts_key(team: str) -> str:
    return f"fw:{{{team}}}:alerts"


def project_scope(project: str) -> str:
    return f"project:{project}"


def reservation_field(project: str, request_id: str) -> str:
    return f"{project}:{request_id}"


def month_of(unix_seconds: float) -> str:
    return _month_of_hour(int(unix_seconds // 3600))


@functools.lru_cache(maxsize=1024)
def _month_of_hour(hour: int) -> str:
    return dt.datetime.fromtimestamp(hour * 3600, dt.UTC).strftime("%Y-%m")


def spend_increments(record: UsageRecord) -> list[tuple[str, int]]:
    """What a record adds to its month's spend, for the team and for its project."""
    amounts = {"cost": record.cost_nusd, "list": record.list_nusd}
    return [(f"{scope}:{basis}", amount) for scope in (TEAM_SCOPE, project_scope(record.project))
            for basis, amount in amounts.items() if amount]


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
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.hard_usd is None and self.soft_usd is None:
            raise ValueError("a budget needs a hard limit, a soft threshold or both")

    @property
    def scope(self) -> str:
        return project_scope(self.project) if self.project else TEAM_SCOPE

    def encode(self) -> str:
        return ";".join((f"hard_nusd={_nusd(self.hard_usd)}", f"soft_nusd={_nusd(self.soft_usd)}",
                         f"basis={self.basis}"))

    @classmethod
    def decode(cls, team: str, scope: str, text: str) -> Budget:
        values = dict(part.split("=", 1) for part in text.split(";"))
        return cls(team, scope.removeprefix("project:") if scope != TEAM_SCOPE else "",
                   _usd(int(values["hard_nusd"])), _usd(int(values["soft_nusd"])), values["basis"])


def _nusd(usd: float | None) -> int:
    return -1 if usd is None else round(usd * NANO_USD_PER_USD)


def _usd(nusd: int) -> float | None:
    return None if nusd < 0 else nusd / NANO_USD_PER_USD


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


# KEYS: 1 budgets, 2 spend (this month), 3 reservations, 4 alerts, 5 the request_id's claim (optional)
# ARGV: 1 reservation field, 2 project scope, 3 max cost nusd, 4 max list nusd, 5 now (unix s), 6 month,
#       7 the claim's owner ("": no claim). A claim another run owns: nothing is held ({3}).
_RESERVE_SCRIPT = """
if ARGV[7] ~= '' and redis.call('HGET', KEYS[5], 'owner') ~= ARGV[7] then
  return {3}
end
local scopes = {'team', ARGV[2]}
local amounts = {cost = tonumber(ARGV[3]), list = tonumber(ARGV[4])}
local budgeted = false
for _, scope in ipairs(scopes) do
  local budget = redis.call('HGET', KEYS[1], scope)
  if budget then
    budgeted = true
    local hard = tonumber(string.match(budget, 'hard_nusd=(%-?%d+)'))
    local soft = tonumber(string.match(budget, 'soft_nusd=(%-?%d+)'))
    local basis = string.match(budget, 'basis=(%a+)')
    local spent = tonumber(redis.call('HGET', KEYS[2], scope .. ':' .. basis) or '0')
    local reserved = tonumber(redis.call('HGET', KEYS[2], scope .. ':reserved_' .. basis) or '0')
    if hard >= 0 and spent + reserved + amounts[basis] > hard then
      return {0, scope, tostring(hard), tostring(spent), tostring(reserved), basis}
    end
    if soft >= 0 and spent >= soft and redis.call('HSETNX', KEYS[2], scope .. ':soft_alerted', ARGV[5]) == 1 then
      redis.call('XADD', KEYS[4], '*', 'scope', scope, 'month', ARGV[6], 'basis', basis,
                 'soft_nusd', tostring(soft), 'spent_nusd', tostring(spent), 'at', ARGV[5])
    end
  end
end
if not budgeted then
  return {2}
end
local held = {}
for _, scope in ipairs(scopes) do
  for _, basis in ipairs({'cost', 'list'}) do
    if amounts[basis] > 0 then
      local field = scope .. ':reserved_' .. basis
      redis.call('HINCRBY', KEYS[2], field, amounts[basis])
      table.insert(held, field .. '=' .. amounts[basis])
    end
  end
end
table.insert(held, 'at=' .. ARGV[5])
table.insert(held, 'month=' .. ARGV[6])
redis.call('HSET', KEYS[3], ARGV[1], table.concat(held, ';'))
return {1}
"""


RELEASE_FUNCTION = """
local function release(reservations, spend, field)
  local reserved = redis.call('HGET', reservations, field)
  if not reserved then
    return 0
  end
  redis.call('HDEL', reservations, field)
  for name, amount in string.gmatch(reserved, '([^=;]+)=([^;]+)') do
    if name ~= 'at' and name ~= 'month' then
      redis.call('HINCRBY', spend, name, -tonumber(amount))
    end
  end
  return 1
end
"""
"""Lua: returns a reservation's amounts to its month's spend hash (shared by the ledger's record script)."""

# KEYS: 1 reservations, 2 spend (the reservation's month); ARGV: 1 reservation field
_RELEASE_SCRIPT = RELEASE_FUNCTION + "return release(KEYS[1], KEYS[2], ARGV[1])"


class BudgetRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.scope)
        self.refusal = refusal


class Budgets:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._reserve = batched_script(redis, _RESERVE_SCRIPT)
        self._release = batched_script(redis, _RELEASE_SCRIPT)

    async def set(self, budget: Budget) -> None:
        await self._redis.hset(budgets_key(budget.team), budget.scope, budget.encode())

    async def delete(self, team: str, project: str = "") -> bool:
        return bool(await self._redis.hdel(budgets_key(team), project_scope(project) if project else TEAM_SCOPE))

    async def list(self, team: str) -> list[Budget]:
        stored = await self._redis.hgetall(budgets_key(team))
        return sorted((Budget.decode(team, scope, text) for scope, text in stored.items()),
                      key=lambda b: (b.project, b.basis))

    async def spend(self, team: str, month: str) -> dict[str, int]:
        """The month's counters: "<scope>:<basis>" and "<scope>:reserved_<basis>" -> nano-dollars."""
        return {k: int(v) for k, v in (await self._redis.hgetall(spend_key(team, month))).items()
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
        """`reserve`, with its script queued at once (fareway/redis_batch.py): calls queued after it in
        the same turn of the loop share its round trip. Await what it returns.

        With `claim` (the key of the request_id's claim, and this run's owner token), nothing is held
        unless the claim, queued ahead of this, is this run's: None then."""
        now = time.time() if now is None else now
        month = month_of(now)
        field = reservation_field(project, request_id)
        keys = [budgets_key(team), spend_key(team, month), reservations_key(team), alerts_key(team)]
        if claim is not None:
            keys.append(claim[0])
        result = self._reserve(keys=keys, args=[field, project_scope(project), max_cost_nusd, max_list_nusd,
                                                f"{now:.3f}", month, claim[1] if claim else ""])
        return _reserved(result, month, field)

    async def release(self, team: str, reservation: Reservation) -> bool:
        """Returns a reservation whose request never ran (so no usage record will settle it)."""
        if not reservation.month:
            return False
        return bool(await self._release(keys=[reservations_key(team), spend_key(team, reservation.month)],
                                        args=[reservation.field]))

    async def release_stale(self, team: str, max_age_s: float, now: float | None = None) -> int:
        """Releases reservations older than max_age_s: their gateway died before recording the
        request, and they would otherwise hold the budget for ever. Returns how many."""
        now = time.time() if now is None else now
        released = 0
        for field, value in (await self._redis.hgetall(reservations_key(team))).items():
            parts = dict(part.split("=", 1) for part in value.split(";"))
            if now - float(parts.get("at", now)) > max_age_s and "month" in parts:
                released += await self.release(team, Reservation(parts["month"], field))
        return released

    async def alerts(self, team: str) -> list[dict[str, str]]:
        return [values for _, values in await self._redis.xrange(alerts_key(team))]


async def _reserved(result: Awaitable[list[Any]], month: str, field: str) -> Reservation | None:
    """What the reservation script answered, as a Reservation, a BudgetRefused, or None (another run's
    claim: nothing held)."""
    answer = await result
    if int(answer[0]) == 3:
        return None
    if int(answer[0]) == 0:
        _, scope, hard, spent, reserved, basis = answer
        raise BudgetRefused(Refusal(scope, int(hard), int(spent), int(reserved), basis))
    return Reservation(month if int(answer[0]) == 1 else "", field)
