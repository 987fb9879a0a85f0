"""The usage ledger in Redis.

Per team (hash-tagged, so one team's keys share a Redis Cluster slot; fareway/redis/keys.py):
  fw:{team}:ledger                      a stream of usage records (trimmed after the retention)
  fw:{team}:usage:<project>:<request>   the ledger entry id of a recorded request (expires with it)
  fw:{team}:rollup:...                  rollups by hour and month (accounting/rollups.py)
  fw:{team}:spend:<YYYY-MM>             the month's spend per budget scope (fareway/quota.py)
  fw:{team}:reservations                budget reservations of requests still running

One Lua script (fareway/redis/lua/ledger_record.lua) records usage records atomically (one
record, or a batch of one team's), in one round trip: deduplicate by request id (a retry or a
replayed spool stays one record), append to the ledger, add to the rollups and the month's spend,
and release the request's budget reservation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from accounting.records import UsageRecord
from accounting.rollups import METRICS, bucket, bucket_start, cell_field, metric_values
from fareway.quota import TEAM_SCOPE, project_scope, reservation_field, spend_field
from fareway.redis import keys
from fareway.redis.batch import batched_script, batcher_for
from fareway.redis.scripts import lua

DEFAULT_RETENTION_DAYS = 400
_KEYS_PER_RECORD = 5
_ARGS_PER_RECORD = 9
_RECORD_SCRIPT = lua("reservation", "ledger_record", METRIC_NAMES=", ".join(f"'{m}'" for m in METRICS),
                     KEYS_PER_RECORD=_KEYS_PER_RECORD, ARGS_PER_RECORD=_ARGS_PER_RECORD)


def spend_increments(record: UsageRecord) -> list[tuple[str, int]]:
    """What a record adds to its month's spend, for the team and for its project."""
    amounts = {"cost": record.cost_nusd, "list": record.list_nusd}
    return [(spend_field(scope, basis), amount) for scope in (TEAM_SCOPE, project_scope(record.project))
            for basis, amount in amounts.items() if amount]


async def _added(recording: Awaitable[Any], indexing: Awaitable[Any]) -> bool:
    added, _ = await asyncio.gather(recording, indexing)
    return bool(added)


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

    def _call(self, team: str, records: Sequence[UsageRecord], now: float) -> tuple[list[str], list[object]]:
        """The record script's keys and arguments for a batch of one team's records."""
        retention_s = self.config.retention_days * 86400
        script_keys = [keys.ledger(team), keys.reservations(team), keys.rollup_index(team, "h"),
                       keys.rollup_index(team, "m")]
        args: list[object] = [retention_s, f"{int((now - retention_s) * 1000)}-0", len(records)]
        for record in records:
            hour, month = bucket("h", record.ended_at), bucket("m", record.ended_at)
            reserved_in = record.budget_period or month
            script_keys += [keys.recorded(team, record.project, record.request_id), keys.rollup(team, "h", hour),
                            keys.rollup(team, "m", month), keys.spend(team, month), keys.spend(team, reserved_in)]
            increments = ";".join(f"{name}={amount}" for name, amount in spend_increments(record))
            reservation = reservation_field(record.project, record.request_id) if record.budget_period else ""
            args += [record.to_json(), hour, month, int(bucket_start(hour)), int(bucket_start(month)),
                     cell_field(record), ",".join(map(str, metric_values(record))), increments, reservation]
        return script_keys, args

    async def record(self, record: UsageRecord, now: float | None = None) -> bool:
        """Records a priced usage record unless its request was already recorded; True if it was new."""
        return await self.record_soon(record, now)

    def record_soon(self, record: UsageRecord, now: float | None = None) -> Coroutine[Any, Any, bool]:
        """`record`, with its script queued at once (fareway/redis/batch.py): calls queued after it in the
        same turn of the loop share its round trip, and none queued later can overtake it. Await what
        it returns."""
        script_keys, args = self._call(record.team, [record], now if now is not None else record.ended_at)
        # The team's set is outside the script (a global key would put the script across Cluster
        # slots), in the same round trip.
        return _added(self._record(keys=script_keys, args=args),
                      self._batcher.command("SADD", keys.TEAMS, record.team))

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
                script_keys, args = self._call(team, batch, at)
                await self._record(keys=script_keys, args=args, client=pipe)
            pipe.sadd(keys.TEAMS, *by_team)
            results = await pipe.execute()
        return sum(int(r) for r in results[:-1])

    async def teams(self) -> list[str]:
        return sorted(await self._redis.smembers(keys.TEAMS))

    async def records(self, team: str, since: float | None = None, until: float | None = None,
                      batch: int = 1000) -> AsyncIterator[UsageRecord]:
        """The team's records that ended in [since, until) (unix seconds; None is open)."""
        # Entries are appended after their request ended, so none that ended at or
        # after `since` has an id before it; late appends (replays) rule out the
        # same shortcut for `until`.
        start = f"{int(since * 1000)}-0" if since is not None else "-"
        while True:
            entries = await self._redis.xrange(keys.ledger(team), min=start, max="+", count=batch)
            for _, values in entries:
                record = UsageRecord.from_fields(values)
                if (since is None or record.ended_at >= since) and (until is None or record.ended_at < until):
                    yield record
            if len(entries) < batch:
                return
            start = f"({entries[-1][0]}"

    async def get(self, team: str, project: str, request_id: str) -> UsageRecord | None:
        entry_id = await self._redis.get(keys.recorded(team, project, request_id))
        if entry_id is None:
            return None
        entries = await self._redis.xrange(keys.ledger(team), min=entry_id, max=entry_id)
        return UsageRecord.from_fields(entries[0][1]) if entries else None
