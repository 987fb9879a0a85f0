"""Reconciliation: the period's totals recomputed from the raw ledger, record
by record, against the rollups that reports read and against the FOCUS
export finance loads, per team, to the nano-dollar. Every record's stored
cost is also re-priced with the price book version that priced it."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from decimal import Decimal

from accounting.exports import ExportConfig, Period, charge_rows, render
from accounting.ledger import Ledger
from accounting.pricebook import PriceBook, price_record
from accounting.pricebook_store import PriceBookStore
from accounting.reports import usage_report
from accounting.rollups import Totals

FIGURES = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "gpu_ns", "cost_nusd", "list_nusd")


@dataclass
class TeamCheck:
    team: str
    ledger: Totals
    rollups: Totals
    export: Totals
    focus_billed_nusd: int
    """Sum of the FOCUS export's BilledCost for the team, read back from its text."""

    @property
    def ok(self) -> bool:
        figures = [tuple(getattr(t, name) for name in FIGURES) for t in (self.ledger, self.rollups, self.export)]
        return figures[0] == figures[1] == figures[2] and self.focus_billed_nusd == self.ledger.cost_nusd


@dataclass
class Reconciliation:
    period: Period
    teams: list[TeamCheck] = field(default_factory=list)
    records: int = 0
    repriced_mismatches: list[str] = field(default_factory=list)
    """Request ids whose stored cost differs from re-pricing them with their price book version."""
    unpriced: list[str] = field(default_factory=list)
    """Request ids recorded without a price book version (Redis was down and they were never replayed)."""

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.teams) and not self.repriced_mismatches and not self.unpriced


def _focus_billed_by_team(text: str) -> dict[str, int]:
    billed: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row["SubAccountId"]:
            nusd = int(Decimal(row["BilledCost"]).scaleb(9))
            billed[row["SubAccountId"]] = billed.get(row["SubAccountId"], 0) + nusd
    return billed


async def reconcile(ledger: Ledger, period: Period) -> Reconciliation:
    result = Reconciliation(period)
    store = PriceBookStore(ledger.redis)
    await store.ensure()
    books: dict[str, PriceBook | None] = {}
    from_ledger: dict[str, Totals] = {}
    for team in await ledger.teams():
        totals = Totals()
        async for record in ledger.records(team, period.start, period.end):
            result.records += 1
            totals.add(Totals.of(record))
            if not record.price_version:
                result.unpriced.append(record.request_id)
                continue
            if record.price_version not in books:
                books[record.price_version] = await store.version(record.price_version)
            book = books[record.price_version]
            repriced = price_record(book, record) if book else None
            if repriced is None or (repriced.cost_nusd, repriced.list_nusd) != (record.cost_nusd, record.list_nusd):
                result.repriced_mismatches.append(record.request_id)
        if totals.requests:
            from_ledger[team] = totals
    rollups = dict(((g[0],), t) for g, t in (await usage_report(ledger, ["team"], since=period.start,
                                                                  until=period.end)).rows)
    rows = await charge_rows(ledger, period)
    exported: dict[str, Totals] = {}
    for row in rows:
        if not row.is_idle:
            exported.setdefault(row.team, Totals()).add(row.totals)
    billed = _focus_billed_by_team(render(rows, period, "focus", ExportConfig()))
    for team in sorted(set(from_ledger) | {g[0] for g in rollups} | set(exported)):
        result.teams.append(TeamCheck(team, from_ledger.get(team, Totals()), rollups.get((team,), Totals()),
                                      exported.get(team, Totals()), billed.get(team, 0)))
    return result
