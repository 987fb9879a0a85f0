"""Rollups: the ledger summed per team, time bucket and group, kept up to date
by the same atomic script that appends each record, so reports over any
number of records read a few hashes instead of the ledger.

Two levels of buckets, by the UTC time the request ended: hours and months.
A report over a range reads the months that fit in it whole, and hours for
the rest (and hours only when it groups by day or week).

  fw:{team}:rollup:<level>:<bucket>   level h or m; bucket 2026-11-24T09 or 2026-11
    <project>␟<model>␟<hardware>␟<worker>␟<status>␞<metric>           -> integer
  fw:{team}:rollup:<level>            the level's buckets, scored by their start

Every metric is an integer added with HINCRBY (tokens, nanoseconds of GPU
time, nano-dollars), so sums are exact and the rollups equal a recomputation
from the ledger.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import json
import re
from dataclasses import dataclass, fields
from decimal import Decimal

from accounting.records import UsageRecord
from fareway.redis import keys

UNIT = "\x1f"
"""Separates the values of a group (no team, model or tag value contains a control character)."""
RECORD = "\x1e"
"""Separates the group from the metric name."""
GROUP_DIMENSIONS = ("project", "model", "hardware_class", "worker", "status", "tags")
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

    @property
    def usd_per_million_tokens(self) -> float | None:
        """Cost to serve plus idle cost per million tokens served (prompt tokens, cached ones included, and
        completion tokens); None without tokens (an idle row). With idle kept apart, a team's row is its
        requests' cost alone and the total carries the idle too."""
        num_tokens = self.prompt_tokens + self.completion_tokens
        return (self.cost_nusd + self.idle_nusd) / num_tokens / 1e3 if num_tokens else None

    def add(self, other: Totals) -> None:
        for name in METRICS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def of(cls, record: UsageRecord) -> Totals:
        return cls(1, record.prompt_tokens, record.cached_tokens, record.completion_tokens,
                   record.gpu_nanoseconds, record.cost_nusd, record.list_nusd)


METRICS = tuple(f.name for f in fields(Totals))
_METRIC_INDEX = {name: i for i, name in enumerate(METRICS)}


def bucket(level: str, unix_seconds: float) -> str:
    return _hour_bucket(level, int(unix_seconds // 3600))


@functools.lru_cache(maxsize=1024)
def _hour_bucket(level: str, hour: int) -> str:
    """Every level's bucket is a whole number of UTC hours: one formatting per hour, not per record."""
    return dt.datetime.fromtimestamp(hour * 3600, dt.UTC).strftime(LEVELS[level])


def hour_bucket(unix_seconds: float) -> str:
    return bucket("h", unix_seconds)


@functools.lru_cache(maxsize=4096)
def bucket_start(name: str) -> float:
    """The start of a bucket of any level, from its name (cached: every record asks for its hour's
    and month's, and strptime is slow)."""
    level = {7: "m", 13: "h"}[len(name)]
    return dt.datetime.strptime(name, LEVELS[level]).replace(tzinfo=dt.UTC).timestamp()


def bucket_end(level: str, start: float) -> float:
    moment = dt.datetime.fromtimestamp(start, dt.UTC)
    if level == "m":
        return start + calendar.monthrange(moment.year, moment.month)[1] * 86400
    return start + 3600


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


def tags_text(tags: dict[str, str]) -> str:
    """Canonical JSON of a tag set ("" for none); json escapes control characters."""
    return json.dumps(tags, sort_keys=True, separators=(",", ":")) if tags else ""


def tags_of(text: str) -> dict[str, str]:
    return json.loads(text) if text else {}


def group_of(record: UsageRecord) -> tuple[str, ...]:
    return (*(_clean(v) for v in (record.project, record.model, record.hardware_class, record.worker_id,
                                  record.status)), tags_text(record.tags))


_CONTROL = re.compile(r"[\x00-\x1f]")


def _clean(value: str) -> str:
    """Separators cannot appear inside a value (names are validated; this is the last line of defence)."""
    return _CONTROL.sub(" ", value)


def cell_field(record: UsageRecord) -> str:
    """The record's cell in a rollup hash (before the metric name)."""
    return UNIT.join(group_of(record))


def metric_values(record: UsageRecord) -> list[int]:
    """The record's amounts, in METRICS order."""
    amounts = Totals.of(record)
    return [getattr(amounts, name) for name in METRICS]


def parse(hash_fields: dict[str, str]) -> dict[tuple[str, ...], Totals]:
    """A rollup hash -> totals per group (values of GROUP_DIMENSIONS)."""
    sums: dict[str, list[int]] = {}
    for name, value in hash_fields.items():
        prefix, _, metric = name.rpartition(RECORD)
        amounts = sums.get(prefix)
        if amounts is None:
            amounts = sums[prefix] = [0] * len(METRICS)
        amounts[_METRIC_INDEX[metric]] += int(value)
    return {tuple(prefix.split(UNIT)): Totals(*amounts) for prefix, amounts in sums.items()}


async def read_rollups(redis, team: str, since: float | None, until: float | None,  # noqa: ANN001 - a Redis client
                       coarsest: str = "m") -> list[tuple[str, dict[tuple[str, ...], Totals]]]:
    """(bucket, cells) of the team's rollups that tile [since, until) (None: open), coarsest
    buckets first where they fit, but none coarser than `coarsest` ("h": hours only)."""
    hours = await redis.zrangebyscore(keys.rollup_index(team, "h"), "-inf" if since is None else since,
                                      f"({until}" if until is not None else "+inf", withscores=True)
    if not hours:
        return []
    # The range narrows to the whole months around the data (open ends widen to them), so the month
    # buckets can tile it and a range of centuries costs no more than the data's months.
    first, last = bucket_start(bucket("m", hours[0][1])), bucket_end("m", bucket_start(bucket("m", hours[-1][1])))
    lo = first if since is None else max(since, first)
    hi = last if until is None else min(until, last)
    wanted = tiles(lo, hi, coarsest)
    existing = {name for name, _ in hours}
    names = [(level, bucket(level, start)) for level, start, _ in wanted
             if level != "h" or bucket("h", start) in existing]
    async with redis.pipeline(transaction=False) as pipe:
        for level, name in names:
            pipe.hgetall(keys.rollup(team, level, name))
        contents = await pipe.execute()
    return [(name, parse(fields)) for (_, name), fields in zip(names, contents) if fields]
