"""The usage ledger in Redis.

Per team (hash-tagged, so one team's keys share a Redis Cluster slot):
  fw:{team}:ledger                      a stream of usage records (trimmed after the retention)
  fw:{team}:usage:<project>:<request>   the ledger entry id of a recorded request (expires with it)
  fw:{team}:rollup:<YYYY-MM-DDTHH>      hourly rollups (accounting/rollups.py)
  fw:{team}:spend:<YYYY-MM>             the month's spend per budget scope (accounting/budgets.py)
  fw:{team}:reservations                budget reservations of requests still running

One Lua script records a usage record atomically, in one round trip:
deduplicate by request id (a retry or a replayed spool stays one record),
append to the ledger, add to the hour's rollup and the month's spend, and
release the request's budget reservation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from accounting import budgets
from accounting.records import UsageRecord
from accounting.rollups import bucket_start, hour_bucket, hours_key, increments, rollup_key

TEAMS_KEY = "fw:teams"
DEFAULT_RETENTION_DAYS = 400

# KEYS: 1 dedupe, 2 ledger, 3 rollup hash, 4 spend hash (the record's month),
#       5 reservations hash, 6 spend hash (the reservation's month), 7 index of rollup hours
# ARGV: 1 retention seconds, 2 trim: ledger ids below this are dropped,
#       3 reservation field ('' if none), 4 #record args, 5 #rollup args, 6 #spend args,
#       7 the rollup hour, 8 its start (unix seconds),
#       then the record's field/value pairs, rollup field/amount pairs, spend field/amount pairs.
_RECORD_SCRIPT = budgets.RELEASE_FUNCTION + """
if ARGV[3] ~= '' then
  release(KEYS[5], KEYS[6], ARGV[3])  -- the request is over, recorded before or not
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local n_record, n_rollup, n_spend = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local first = 9
local entry = redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[2], '*', unpack(ARGV, first, first + n_record - 1))
redis.call('SET', KEYS[1], entry, 'EX', ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[8], ARGV[7])
for i = first + n_record, first + n_record + n_rollup - 1, 2 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
end
for i = first + n_record + n_rollup, first + n_record + n_rollup + n_spend - 1, 2 do
  redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1])
end
return 1
"""


def ledger_key(team: str) -> str:
    return f"fw:{{{team}}}:ledger"


def dedupe_key(team: str, project: str, request_id: str) -> str:
    return f"fw:{{{team}}}:usage:{project}:{request_id}"


@dataclass(frozen=True)
class LedgerConfig:
    retention_days: int = DEFAULT_RETENTION_DAYS
    """Raw records (and their request-id deduplication) are kept this long; rollups for ever."""

    def __post_init__(self) -> None:
        if self.retention_days < 1:
            raise ValueError(f"retention_days must be at least 1, got {self.retention_days}")


def _flat(pairs: Sequence[tuple[str, object]]) -> list[object]:
    return [item for pair in pairs for item in pair]


class Ledger:
    def __init__(self, redis: aioredis.Redis, config: LedgerConfig | None = None) -> None:
        self._redis = redis
        self.config = config or LedgerConfig()
        self._record = redis.register_script(_RECORD_SCRIPT)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    def _script_call(self, record: UsageRecord, now: float) -> tuple[list[str], list[object]]:
        retention_s = self.config.retention_days * 86400
        month = dt.datetime.fromtimestamp(record.ended_at, dt.UTC).strftime("%Y-%m")
        reservation_month = record.budget_period or month
        hour = hour_bucket(record.ended_at)
        keys = [dedupe_key(record.team, record.project, record.request_id), ledger_key(record.team),
                rollup_key(record.team, hour), budgets.spend_key(record.team, month),
                budgets.reservations_key(record.team), budgets.spend_key(record.team, reservation_month),
                hours_key(record.team)]
        fields = list(record.to_fields().items())
        rollup = increments(record)
        spend = budgets.spend_increments(record)
        reservation = budgets.reservation_field(record.project, record.request_id) if record.budget_period else ""
        args: list[object] = [retention_s, f"{int((now - retention_s) * 1000)}-0", reservation,
                              2 * len(fields), 2 * len(rollup), 2 * len(spend), hour, int(bucket_start(hour)),
                              *_flat(fields), *_flat(rollup), *_flat(spend)]
        return keys, args

    async def record(self, record: UsageRecord, now: float | None = None) -> bool:
        """Records a priced usage record unless its request was already recorded; True if it was new."""
        keys, args = self._script_call(record, now if now is not None else record.ended_at)
        added = await self._record(keys=keys, args=args)
        # Outside the script: a global key would put the script across Cluster slots.
        await self._redis.sadd(TEAMS_KEY, record.team)
        return bool(added)

    async def record_many(self, records: Sequence[UsageRecord], now: float | None = None) -> int:
        """Records a batch in one pipelined round trip; returns how many were new."""
        if not records:
            return 0
        # Load the script first: a pipeline cannot fall back from EVALSHA to EVAL.
        await self._redis.script_load(_RECORD_SCRIPT)
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in records:
                keys, args = self._script_call(record, now if now is not None else record.ended_at)
                await self._record(keys=keys, args=args, client=pipe)
            pipe.sadd(TEAMS_KEY, *{r.team for r in records})
            results = await pipe.execute()
        return sum(int(r) for r in results[:-1])

    async def teams(self) -> list[str]:
        return sorted(await self._redis.smembers(TEAMS_KEY))

    async def records(self, team: str, since: float | None = None, until: float | None = None,
                      batch: int = 1000) -> AsyncIterator[UsageRecord]:
        """The team's records that ended in [since, until) (unix seconds; None is open)."""
        # Entries are appended after their request ended, so none that ended at or
        # after `since` has an id before it; late appends (replays) rule out the
        # same shortcut for `until`.
        start = f"{int(since * 1000)}-0" if since is not None else "-"
        while True:
            entries = await self._redis.xrange(ledger_key(team), min=start, max="+", count=batch)
            for _, values in entries:
                record = UsageRecord.from_fields(values)
                if (since is None or record.ended_at >= since) and (until is None or record.ended_at < until):
                    yield record
            if len(entries) < batch:
                return
            start = f"({entries[-1][0]}"

    async def get(self, team: str, project: str, request_id: str) -> UsageRecord | None:
        entry_id = await self._redis.get(dedupe_key(team, project, request_id))
        if entry_id is None:
            return None
        entries = await self._redis.xrange(ledger_key(team), min=entry_id, max=entry_id)
        return UsageRecord.from_fields(entries[0][1]) if entries else None
