"""The usage ledger in Redis.

Per team (hash-tagged, so one team's keys share a Redis Cluster slot):
  fw:{team}:ledger                      a stream of usage records (trimmed after the retention)
  fw:{team}:usage:<project>:<request>   the ledger entry id of a recorded request (expires with it)
  fw:{team}:rollup:…                    rollups by hour and month (accounting/rollups.py)
  fw:{team}:spend:<YYYY-MM>             the month's spend per budget scope (accounting/budgets.py)
  fw:{team}:reservations                budget reservations of requests still running

One Lua script records usage records atomically (one record, or a batch of
one team's), in one round trip: deduplicate by request id (a retry or a
replayed spool stays one record), append to the ledger, add to the rollups
and the month's spend, and release the request's budget reservation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from accounting import budgets
from accounting.records import UsageRecord
from accounting.rollups import METRICS, bucket, bucket_start, cell_field, metric_values
from fareway.redis_batch import batched_script, batcher_for

TEAMS_KEY = "fw:teams"
DEFAULT_RETENTION_DAYS = 400
_ARGS_PER_RECORD = 12

# Records a batch of one team's usage records. KEYS[1] is the team's key
# prefix, fw:{team}: — every key the script touches is built under it, so all
# of them share the prefix's Cluster slot.
# ARGV: 1 retention seconds, 2 trim (ledger ids below it are dropped), 3 #records, then per record:
#   project, request id, JSON, hour, month, hour start, month start,
#   rollup cell, metrics (comma-separated, METRICS order),
#   spend fields and amounts ("field=amount;..."), reservation field ('' if none), its month.
_RECORD_SCRIPT = budgets.RELEASE_FUNCTION + r"""
local prefix = KEYS[1]
local ttl, trim, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local metric_names = {%(metrics)s}
local levels = {'h', 'm'}
local indexed = {}
local added = 0
local i = 4
for _ = 1, n do
  local project, request_id, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local buckets = {ARGV[i + 3], ARGV[i + 4]}
  local starts = {ARGV[i + 5], ARGV[i + 6]}
  local cell, metrics, spend = ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local reservation, reservation_month = ARGV[i + 10], ARGV[i + 11]
  i = i + %(per_record)d
  if reservation ~= '' then
    release(prefix .. 'reservations', prefix .. 'spend:' .. reservation_month, reservation)
  end
  local dedupe = prefix .. 'usage:' .. project .. ':' .. request_id
  if redis.call('EXISTS', dedupe) == 0 then
    local entry = redis.call('XADD', prefix .. 'ledger', 'MINID', '~', trim, '*', 'json', body)
    redis.call('SET', dedupe, entry, 'EX', ttl)
    for l = 1, 2 do
      local rollup = prefix .. 'rollup:' .. levels[l] .. ':' .. buckets[l]
      if not indexed[rollup] then
        redis.call('ZADD', prefix .. 'rollup:' .. levels[l], starts[l], buckets[l])
        indexed[rollup] = true
      end
      local m = 0
      for amount in string.gmatch(metrics, '[^,]+') do
        m = m + 1
        if amount ~= '0' then
          redis.call('HINCRBY', rollup, cell .. '\30' .. metric_names[m], amount)
        end
      end
    end
    for field, amount in string.gmatch(spend, '([^=;]+)=([^;]+)') do
      redis.call('HINCRBY', prefix .. 'spend:' .. buckets[2], field, amount)
    end
    added = added + 1
  end
end
return added
""" % {"metrics": ", ".join(f"'{m}'" for m in METRICS), "per_record": _ARGS_PER_RECORD}


async def _added(recording: Awaitable[Any], indexing: Awaitable[Any]) -> bool:
    added, _ = await asyncio.gather(recording, indexing)
    return bool(added)


def team_prefix(team: str) -> str:
    return f"fw:{{{team}}}:"


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


class Ledger:
    def __init__(self, redis: aioredis.Redis, config: LedgerConfig | None = None) -> None:
        self._redis = redis
        self.config = config or LedgerConfig()
        self._record = batched_script(redis, _RECORD_SCRIPT)
        self._batcher = batcher_for(redis)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    def _header(self, now: float, count: int) -> list[object]:
        retention_s = self.config.retention_days * 86400
        return [retention_s, f"{int((now - retention_s) * 1000)}-0", count]

    @staticmethod
    def _args(record: UsageRecord) -> list[object]:
        names = [bucket(level, record.ended_at) for level in ("h", "m")]
        spend = ";".join(f"{field}={amount}" for field, amount in budgets.spend_increments(record))
        reservation = budgets.reservation_field(record.project, record.request_id) if record.budget_period else ""
        return [record.project, record.request_id, record.to_json(), *names, *(int(bucket_start(n)) for n in names),
                cell_field(record), ",".join(map(str, metric_values(record))), spend, reservation,
                record.budget_period]

    async def record(self, record: UsageRecord, now: float | None = None) -> bool:
        """Records a priced usage record unless its request was already recorded; True if it was new."""
        return await self.record_soon(record, now)

    def record_soon(self, record: UsageRecord, now: float | None = None) -> Coroutine[Any, Any, bool]:
        """`record`, with its script queued at once (fareway/redis_batch.py): calls queued after it in the
        same turn of the loop share its round trip, and none queued later can overtake it. Await what
        it returns."""
        args = self._header(now if now is not None else record.ended_at, 1) + self._args(record)
        # The team's set is outside the script (a global key would put the script across Cluster
        # slots), in the same round trip.
        return _added(self._record(keys=[team_prefix(record.team)], args=args),
                      self._batcher.command("SADD", TEAMS_KEY, record.team))

    async def record_many(self, records: Sequence[UsageRecord], now: float | None = None) -> int:
        """Records a batch, one script call per team, in one pipelined round trip; returns how many were new."""
        if not records:
            return 0
        by_team: dict[str, list[UsageRecord]] = {}
        for record in records:
            by_team.setdefault(record.team, []).append(record)
        # Load the script first: a pipeline cannot fall back from EVALSHA to EVAL.
        await self._redis.script_load(_RECORD_SCRIPT)
        async with self._redis.pipeline(transaction=False) as pipe:
            for team, batch in by_team.items():
                at = now if now is not None else max(r.ended_at for r in batch)
                args = self._header(at, len(batch))
                for record in batch:
                    args.extend(self._args(record))
                await self._record(keys=[team_prefix(team)], args=args, client=pipe)
            pipe.sadd(TEAMS_KEY, *by_team)
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
