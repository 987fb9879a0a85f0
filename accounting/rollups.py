"""Rollups: the ledger summed per team, time bucket and group, kept up to date
by the same atomic script that appends each record, so reports over any
number of records read a few hashes instead of the ledger.

Two levels of buckets, by the UTC time the request ended: hours and months.
A report over a range reads the months that fit in it whole, and hours for
the rest (and hours only when it groups by day or week).

  fw:{team}:rollup:<level>:<bucket>   level h or m; bucket 2026-11-24T09 or 2026-11
    <project>␟<model>␟<hardware>␟<worker>␟<status>␞<metric>           -> integer
  fw:{team}:tags:m:<bucket>           the same per tag and month, read only to group by a tag
    <key>␟<value>␟<project>␟<model>␟<hardware>␟<worker>␟<status>␞<metric>
  fw:{team}:rollup:<level>            the level's buckets, scored by their start

Every metric is an integer added with HINCRBY (tokens, nanoseconds of GPU
time, nano-dollars), so sums are exact and the rollups equal a recomputation
from the ledger.
"""

from __future__ import annotations

import calendar
import re
import datetime as dt
from dataclasses import dataclass, fields
from decimal import Decimal

from accounting.records import UsageRecord

UNIT = "\x1f"
"""Separates the values of a group (no team, model or tag value contains a control character)."""
RECORD = "\x1e"
"""Separates the group from the metric name."""
GROUP_DIMENSIONS = ("project", "model", "hardware_class", "worker", "status")
"""The dimensions a rollup keeps, after the team (which is in the key) and the time (the bucket)."""
LEVELS = {"m": "%Y-%m", "h": "%Y-%m-%dT%H"}
"""Bucket levels, coarsest first, and their bucket names."""


@dataclass
class Totals:
    """Summed usage and cost; every field is an exact integer."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    gpu_ns: int = 0
    cost_nusd: int = 0
    list_nusd: int = 0
    idle_nusd: int = 0
    """Idle device time's cost: on idle rows, or a row's share of it (never in the rollups)."""

    @property
    def gpu_seconds(self) -> float:
        return self.gpu_ns / 1e9

    @property
    def cost_usd(self) -> Decimal:
        """Cost to serve, exact."""
        return Decimal(self.cost_nusd).scaleb(-9)

    @property
    def idle_usd(self) -> Decimal:
        return Decimal(self.idle_nusd).scaleb(-9)

    @property
    def list_usd(self) -> Decimal:
        """List price, exact."""
        return Decimal(self.list_nusd).scaleb(-9)

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompt tokens served from the prefix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def add(self, other: Totals) -> None:
        for name in METRICS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def of(cls, record: UsageRecord) -> Totals:
        return cls(1, record.prompt_tokens, record.cached_tokens, record.completion_tokens,
                   record.gpu_nanoseconds, record.cost_nusd, record.list_nusd)


METRICS = tuple(f.name for f in fields(Totals))


def bucket(level: str, unix_seconds: float) -> str:
    return dt.datetime.fromtimestamp(unix_seconds, dt.UTC).strftime(LEVELS[level])


def hour_bucket(unix_seconds: float) -> str:
    return bucket("h", unix_seconds)


def bucket_start(name: str) -> float:
    """The start of a bucket of any level, from its name."""
    level = {7: "m", 13: "h"}[len(name)]
    return dt.datetime.strptime(name, LEVELS[level]).replace(tzinfo=dt.UTC).timestamp()


def bucket_end(level: str, start: float) -> float:
    moment = dt.datetime.fromtimestamp(start, dt.UTC)
    if level == "m":
        return start + calendar.monthrange(moment.year, moment.month)[1] * 86400
    return start + 3600


def rollup_key(team: str, level: str, name: str) -> str:
    return f"fw:{{{team}}}:rollup:{level}:{name}"


def tags_key(team: str, level: str, name: str) -> str:
    return f"fw:{{{team}}}:tags:{level}:{name}"


def index_key(team: str, level: str) -> str:
    return f"fw:{{{team}}}:rollup:{level}"


def tiles(since: float, until: float, finest_time: str = "m") -> list[tuple[str, float, float]]:
    """The coarsest buckets (level, start, end) that exactly cover [since, until), both on the hour.

    finest_time is the coarsest level the caller may see ("h" when it groups by day or week):
    a record in a month bucket only knows its month.
    """
    levels = list(LEVELS)[list(LEVELS).index(finest_time):]
    out: list[tuple[str, float, float]] = []
    at = since
    while at < until:
        for level in levels:  # coarsest first
            start = bucket_start(bucket(level, at))
            end = bucket_end(level, start)
            if start == at and end <= until:
                out.append((level, start, end))
                at = end
                break
    return out


def group_of(record: UsageRecord) -> tuple[str, ...]:
    return tuple(_clean(v) for v in (record.project, record.model, record.hardware_class, record.worker_id,
                                     record.status))


_CONTROL = re.compile(r"[\x00-\x1f]")


def _clean(value: str) -> str:
    """Separators cannot appear inside a value (names are validated; this is the last line of defence)."""
    return _CONTROL.sub(" ", value)


def cell_fields(record: UsageRecord) -> tuple[str, list[str]]:
    """The record's group cell, and its tag cells (key, value, group)."""
    group = UNIT.join(group_of(record))
    return group, [UNIT.join((_clean(k), _clean(v), group)) for k, v in sorted(record.tags.items())]


def metric_values(record: UsageRecord) -> list[int]:
    """The record's amounts, in METRICS order."""
    amounts = Totals.of(record)
    return [getattr(amounts, name) for name in METRICS]


@dataclass(frozen=True)
class RollupCell:
    group: tuple[str, ...]
    """Values of GROUP_DIMENSIONS."""
    tag: tuple[str, str] | None
    """(key, value) for a tag cell; None for the plain group."""


def parse(hash_fields: dict[str, str], tags: bool = False) -> dict[RollupCell, Totals]:
    """A rollup hash (or, with tags, a tags hash) -> totals per cell."""
    cells: dict[RollupCell, Totals] = {}
    for name, value in hash_fields.items():
        prefix, _, metric = name.rpartition(RECORD)
        parts = tuple(prefix.split(UNIT))
        cell = RollupCell(parts[2:], (parts[0], parts[1])) if tags else RollupCell(parts, None)
        totals = cells.get(cell)
        if totals is None:
            totals = cells[cell] = Totals()
        setattr(totals, metric, getattr(totals, metric) + int(value))
    return cells


async def read_rollups(redis, team: str, since: float | None, until: float | None,  # noqa: ANN001 - a Redis client
                       tags: bool = False, coarsest: str = "m") -> list[tuple[str, dict[RollupCell, Totals]]]:
    """(bucket, cells) of the team's rollups that tile [since, until) (None: open), coarsest
    buckets first where they fit, but none coarser than `coarsest` ("h": hours only)."""
    hours = await redis.zrangebyscore(index_key(team, "h"), "-inf" if since is None else since,
                                      f"({until}" if until is not None else "+inf", withscores=True)
    if not hours:
        return []
    # Open ends widen to whole months around the data, so the month buckets can tile them.
    lo = bucket_start(bucket("m", hours[0][1])) if since is None else since
    hi = bucket_end("m", bucket_start(bucket("m", hours[-1][1]))) if until is None else until
    wanted = tiles(lo, hi, coarsest)
    existing = {name for name, _ in hours}
    names = [(level, bucket(level, start)) for level, start, _ in wanted
             if level != "h" or bucket("h", start) in existing]
    async with redis.pipeline(transaction=False) as pipe:
        for level, name in names:
            pipe.hgetall((tags_key if tags else rollup_key)(team, level, name))
        contents = await pipe.execute()
    return [(name, parse(fields, tags)) for (_, name), fields in zip(names, contents) if fields]
