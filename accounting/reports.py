"""Usage reports: the ledger grouped by any mix of dimensions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from accounting.ledger import Ledger
from accounting.records import UsageRecord
from fareway.errors import InvalidArgument

_DIMENSIONS: dict[str, Callable[[UsageRecord], str]] = {
    "team": lambda r: r.team,
    "project": lambda r: r.project,
    "model": lambda r: r.model,
    "hardware_class": lambda r: r.hardware_class,
    "worker": lambda r: r.worker_id,
    "status": lambda r: r.status,
    "day": lambda r: dt.datetime.fromtimestamp(r.ended_at, dt.UTC).date().isoformat(),
}
DIMENSIONS = (*_DIMENSIONS, "tag:<name>")


def dimension(name: str) -> Callable[[UsageRecord], str]:
    if name.startswith("tag:") and len(name) > 4:
        tag = name[4:]
        return lambda r: r.tags.get(tag, "")
    if name not in _DIMENSIONS:
        raise InvalidArgument(f"cannot group by {name!r}; use any of {', '.join(DIMENSIONS)}", field="group_by")
    return _DIMENSIONS[name]


@dataclass
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    gpu_seconds: float = 0.0

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += record.prompt_tokens
        self.cached_tokens += record.cached_tokens
        self.completion_tokens += record.completion_tokens
        self.gpu_seconds += record.gpu_seconds


@dataclass(frozen=True)
class UsageReport:
    group_by: tuple[str, ...]
    rows: list[tuple[tuple[str, ...], UsageTotals]]
    """Sorted by group values."""
    total: UsageTotals


async def usage_report(ledger: Ledger, group_by: Sequence[str], *, since: float | None = None,
                       until: float | None = None, teams: Sequence[str] | None = None) -> UsageReport:
    """Totals per group over records that ended in [since, until), for the given teams (None: all)."""
    keys = [dimension(name) for name in group_by]
    groups: dict[tuple[str, ...], UsageTotals] = {}
    total = UsageTotals()
    for team in teams if teams is not None else await ledger.teams():
        async for record in ledger.records(team, since, until):
            groups.setdefault(tuple(key(record) for key in keys), UsageTotals()).add(record)
            total.add(record)
    return UsageReport(tuple(group_by), sorted(groups.items()), total)
