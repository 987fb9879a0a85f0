"""The usage ledger in Redis.

Per team (hash-tagged, so one team's keys share a Redis Cluster slot):
  fw:{team}:ledger                     a stream of usage records
  fw:{team}:usage:<project>:<request>  the ledger entry id of a recorded request
One Lua script deduplicates and appends atomically, in one round trip: a
request recorded twice (a retry, a replayed spool) stays one record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from accounting.records import UsageRecord

TEAMS_KEY = "fw:teams"

# KEYS[1] dedupe key, KEYS[2] ledger stream; ARGV: field, value, field, value, ...
_RECORD_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local entry = redis.call('XADD', KEYS[2], '*', unpack(ARGV))
redis.call('SET', KEYS[1], entry)
return 1
"""


def ledger_key(team: str) -> str:
    return f"fw:{{{team}}}:ledger"


def dedupe_key(team: str, project: str, request_id: str) -> str:
    return f"fw:{{{team}}}:usage:{project}:{request_id}"


class Ledger:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._record = redis.register_script(_RECORD_SCRIPT)

    async def record(self, record: UsageRecord) -> bool:
        """Appends the record unless its request was already recorded; True if it was new."""
        flat = [item for pair in record.to_fields().items() for item in pair]
        keys = [dedupe_key(record.team, record.project, record.request_id), ledger_key(record.team)]
        added = await self._record(keys=keys, args=flat)
        # Outside the script: a global key would put the script across Cluster slots.
        await self._redis.sadd(TEAMS_KEY, record.team)
        return bool(added)

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
            for entry_id, values in entries:
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
