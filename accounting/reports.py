"""Usage and cost reports: totals grouped by any mix of dimensions.

Reports over whole hours (every range whose ends fall on the hour, or are
open) read the rollups, a few hashes per team whatever the number of
records (months where they fit, hours for the rest, hours only to group by
day or week); other ranges read the ledger record by record. Both give the
same exact integers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import redis.asyncio as aioredis

from accounting.capacity import CapacityCell, CapacityStore
from accounting.ledger import Ledger
from accounting.pricebook import PriceBook
from accounting.pricebook_store import PriceBookStore
from accounting.records import UsageRecord
from accounting.rollups import GROUP_DIMENSIONS, Totals, bucket_start, group_of, read_rollups, tags_of
from fareway.errors import InvalidArgument, shown

TIME_DIMENSIONS = ("day", "week", "month")
DIMENSIONS = ("team", *GROUP_DIMENSIONS[:-1], "metering", *TIME_DIMENSIONS, "tag:<name>")
_HOUR_S = 3600
_WORKER = GROUP_DIMENSIONS.index("worker")


@dataclass(frozen=True)
class Cell:
    """What a dimension can read: one record, or one rollup cell."""

    team: str
    group: tuple[str, ...]
    """Values of GROUP_DIMENSIONS."""
    ended_at: float
    """The record's end, or the rollup hour's start."""
    tags: dict[str, str]
    metering: str = "engine-steps"
    """How its worker metered device time: "engine-steps" or "observed" (the capacity registry's word,
    as in the exports)."""


def _time_key(fmt: str) -> Callable[[Cell], str]:
    return lambda c: dt.datetime.fromtimestamp(c.ended_at, dt.UTC).strftime(fmt)


_KEYS: dict[str, Callable[[Cell], str]] = {
    "team": lambda c: c.team,
    **{name: (lambda i: lambda c: c.group[i])(i) for i, name in enumerate(GROUP_DIMENSIONS[:-1])},
    "metering": lambda c: c.metering,
    "day": _time_key("%Y-%m-%d"),
    "week": _time_key("%G-W%V"),
    "month": _time_key("%Y-%m"),
}


def dimension(name: str) -> Callable[[Cell], str]:
    if name.startswith("tag:") and len(name) > 4:
        tag = name[4:]
        return lambda c: c.tags.get(tag, "")
    if name not in _KEYS:
        raise InvalidArgument(f"cannot group by {shown(name)}; use any of {', '.join(DIMENSIONS)}", field="group_by")
    return _KEYS[name]


@dataclass(frozen=True)
class UsageReport:
    group_by: tuple[str, ...]
    rows: list[tuple[tuple[str, ...], Totals]]
    """Sorted by group values."""
    total: Totals


def _on_the_hour(instant: float | None) -> bool:
    return instant is None or instant % _HOUR_S == 0


IDLE_MODES = ("separate", "share", "none")
IDLE_TEAM = "(unallocated)"
"""The team of idle rows: device time no request used."""


async def usage_report(ledger: Ledger, group_by: Sequence[str], *, since: float | None = None,
                       until: float | None = None, teams: Sequence[str] | None = None,
                       idle: str = "none") -> UsageReport:
    """Totals per group over records that ended in [since, until), for the given teams (None: all).

    idle: "separate" adds the workers' idle device time as rows of team
    "(unallocated)"; "share" spreads its cost over the rows in proportion to their
    cost to serve (as OpenCost shares idle cost); "none" leaves it out. Idle
    time is counted per whole hour (the hours that start in the range), and
    only with all teams (an idle device belongs to no team).
    """
    if idle not in IDLE_MODES:
        raise InvalidArgument(f"idle must be one of {', '.join(IDLE_MODES)}, got {shown(idle)}", field="idle")
    report = await _records_report(ledger, group_by, since, until, teams)
    if idle == "none" or teams is not None:
        return report
    cells = await CapacityStore(ledger.redis).cells(since, until)
    book = await PriceBookStore(ledger.redis).ensure()
    idle_rows = _idle_rows(group_by, cells, book)
    if idle == "share" and report.total.cost_nusd > 0:
        return _share_idle(report, sum(t.idle_nusd for _, t in idle_rows))
    return _with_rows(report, idle_rows)


async def _records_report(ledger: Ledger, group_by: Sequence[str], since: float | None, until: float | None,
                          teams: Sequence[str] | None) -> UsageReport:
    keys = [dimension(name) for name in group_by]
    teams = list(teams) if teams is not None else await ledger.teams()
    if _on_the_hour(since) and _on_the_hour(until):
        coarsest = "h" if {"day", "week"} & set(group_by) else "m"
        cells = _rollup_cells(ledger.redis, teams, since, until, coarsest)
    else:
        cells = _ledger_cells(ledger, teams, since, until)
    metering: dict[str, str] = {}
    if "metering" in group_by:
        metering = {w.worker_id: w.metering for w in await CapacityStore(ledger.redis).workers()}
    groups: dict[tuple[str, ...], Totals] = {}
    total = Totals()
    async for cell, totals in cells:
        if metering:
            cell = replace(cell, metering=metering.get(cell.group[_WORKER], "engine-steps"))
        groups.setdefault(tuple(key(cell) for key in keys), Totals()).add(totals)
        total.add(totals)
    return UsageReport(tuple(group_by), sorted(groups.items()), total)


async def _ledger_cells(ledger: Ledger, teams: Sequence[str], since: float | None, until: float | None):  # noqa: ANN202
    for team in teams:
        async for record in ledger.records(team, since, until):
            yield _record_cell(record), Totals.of(record)


def _record_cell(record: UsageRecord) -> Cell:
    return Cell(record.team, group_of(record), record.ended_at, record.tags)


async def _rollup_cells(redis: aioredis.Redis, teams: Sequence[str], since: float | None, until: float | None,  # noqa: ANN202
                        coarsest: str):
    """Cells of the rollup buckets tiling [since, until)."""
    for team in teams:
        for name, cells in await read_rollups(redis, team, since, until, coarsest=coarsest):
            start = bucket_start(name)
            for group, totals in cells.items():
                yield Cell(team, group, start, tags_of(group[-1])), totals


def idle_cost_nusd(book: PriceBook, cell: CapacityCell) -> int:
    price = book.hardware_price(cell.worker.hardware_class, bucket_start(cell.hour))
    return price.cost_nusd(cell.idle_ns / 1e9) if price else 0


def _idle_rows(group_by: Sequence[str], cells: Sequence[CapacityCell],
               book: PriceBook) -> list[tuple[tuple[str, ...], Totals]]:
    keys = [dimension(name) for name in group_by]
    rows: dict[tuple[str, ...], Totals] = {}
    for cell in cells:
        if not cell.idle_ns:
            continue
        view = Cell(IDLE_TEAM, ("", "", cell.worker.hardware_class, cell.worker.worker_id, "", ""),
                    bucket_start(cell.hour), {}, cell.worker.metering)
        totals = rows.setdefault(tuple(key(view) for key in keys), Totals())
        totals.gpu_ns += cell.idle_ns
        totals.idle_nusd += idle_cost_nusd(book, cell)
    return list(rows.items())


def _with_rows(report: UsageReport, extra: list[tuple[tuple[str, ...], Totals]]) -> UsageReport:
    groups = dict(report.rows)
    total = Totals()
    total.add(report.total)
    for group, totals in extra:
        groups.setdefault(group, Totals()).add(totals)
        total.add(totals)
    return UsageReport(report.group_by, sorted(groups.items()), total)


def _share_idle(report: UsageReport, idle_nusd: int) -> UsageReport:
    """Spreads idle_nusd over the rows by their cost to serve; the shares add up to it exactly
    (largest remainders get the leftover nano-dollars)."""
    weights = [t.cost_nusd for _, t in report.rows]
    total_weight = sum(weights)
    parts = [divmod(idle_nusd * w, total_weight) for w in weights]  # integers: exact at any size
    shares = [quotient for quotient, _ in parts]
    by_remainder = sorted(range(len(parts)), key=lambda i: parts[i][1], reverse=True)
    for i in by_remainder[: idle_nusd - sum(shares)]:
        shares[i] += 1
    for (_, totals), share in zip(report.rows, shares):
        totals.idle_nusd += share
    report.total.idle_nusd += idle_nusd
    return report
