"""Hourly rollups: the ledger summed per team, hour and group, kept up to date
by the same atomic script that appends each record, so reports over any
number of records read a few hashes instead of the ledger.

  fw:{team}:rollup:<YYYY-MM-DDTHH>   a hash per team and UTC hour of request end
    <project>␟<model>␟<hardware>␟<worker>␟<status>␞<metric>       -> integer
    tag␟<key>␟<value>␟<project>␟...␟<status>␞<metric>             -> integer

Every metric is an integer (tokens, nanoseconds of GPU time, nano-dollars),
so sums are exact and the rollups equal a recomputation from the ledger.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from decimal import Decimal

from accounting.records import UsageRecord

UNIT = "\x1f"
"""Separates the values of a group (no team, model or tag value contains a control character)."""
RECORD = "\x1e"
"""Separates the group from the metric name."""
TAG = "tag"
GROUP_DIMENSIONS = ("project", "model", "hardware_class", "worker", "status")
"""The dimensions a rollup keeps, after the team (which is in the key) and the hour (the bucket)."""
HOUR_FORMAT = "%Y-%m-%dT%H"


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


def hour_bucket(unix_seconds: float) -> str:
    return dt.datetime.fromtimestamp(unix_seconds, dt.UTC).strftime(HOUR_FORMAT)


def bucket_start(bucket: str) -> float:
    return dt.datetime.strptime(bucket, HOUR_FORMAT).replace(tzinfo=dt.UTC).timestamp()


def rollup_key(team: str, bucket: str) -> str:
    return f"fw:{{{team}}}:rollup:{bucket}"


def hours_key(team: str) -> str:
    """A sorted set of the team's rollup hours, scored by their start."""
    return f"fw:{{{team}}}:rollup:hours"


def group_of(record: UsageRecord) -> tuple[str, ...]:
    return tuple(_clean(v) for v in (record.project, record.model, record.hardware_class, record.worker_id,
                                     record.status))


def _clean(value: str) -> str:
    """Separators cannot appear inside a value (names are validated; this is the last line of defence)."""
    return value.replace(UNIT, " ").replace(RECORD, " ")


def increments(record: UsageRecord) -> list[tuple[str, int]]:
    """The (field, amount) pairs one record adds to its hour's rollup: its group, then each of its tags."""
    amounts = Totals.of(record)
    group = UNIT.join(group_of(record))
    prefixes = [group] + [UNIT.join((TAG, _clean(key), _clean(value), group))
                          for key, value in sorted(record.tags.items())]
    return [(f"{prefix}{RECORD}{metric}", getattr(amounts, metric))
            for prefix in prefixes for metric in METRICS if getattr(amounts, metric)]


@dataclass(frozen=True)
class RollupCell:
    group: tuple[str, ...]
    """Values of GROUP_DIMENSIONS."""
    tag: tuple[str, str] | None
    """(key, value) for a tag cell; None for the plain group."""


def parse(hash_fields: dict[str, str]) -> dict[RollupCell, Totals]:
    """A rollup hash -> totals per cell."""
    cells: dict[RollupCell, Totals] = {}
    for name, value in hash_fields.items():
        prefix, _, metric = name.rpartition(RECORD)
        parts = tuple(prefix.split(UNIT))
        if parts[0] == TAG and len(parts) == len(GROUP_DIMENSIONS) + 3:
            cell = RollupCell(parts[3:], (parts[1], parts[2]))
        else:
            cell = RollupCell(parts, None)
        totals = cells.setdefault(cell, Totals())
        setattr(totals, metric, getattr(totals, metric) + int(value))
    return cells
