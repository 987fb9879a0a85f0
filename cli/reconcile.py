"""`fareway reconcile --period 2026-11`: the ledger, the rollups and the export agree, to the nano-dollar."""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console
from rich.table import Table

from accounting.exports import period
from accounting.ledger import Ledger
from accounting.reconcile import FIGURES, Reconciliation, reconcile
from fareway.config import RedisConfig
from fareway.redis.embedded import redis_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--period", required=True, type=period, help="the billing month, e.g. 2026-11")


async def _reconcile(args: argparse.Namespace) -> Reconciliation:
    async with redis_session(RedisConfig.from_env()) as redis:
        return await reconcile(Ledger(redis), args.period)


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(_reconcile(args))
    table = Table(title=f"reconciliation of {result.period.name}: ledger vs rollups vs export", title_justify="left")
    for column in ("team", "source", *FIGURES, "FOCUS BilledCost (nUSD)", ""):
        table.add_column(column, justify="left" if column in ("team", "source") else "right")
    for check in result.teams:
        for source, totals in (("ledger", check.ledger), ("rollups", check.rollups), ("export", check.export)):
            billed = str(check.focus_billed_nusd) if source == "export" else ""
            verdict = ("ok" if check.ok else "MISMATCH") if source == "export" else ""
            table.add_row(check.team if source == "ledger" else "", source,
                          *(f"{getattr(totals, name):,}" for name in FIGURES), billed, verdict)
        table.add_section()
    console = Console()
    console.print(table)
    console.print(f"{result.records} records re-priced with their price book versions: "
                  f"{len(result.repriced_mismatches)} differ, {len(result.unpriced)} unpriced.")
    console.print("[green]reconciled[/green]: every figure agrees to the nano-dollar" if result.ok
                  else "[red]NOT reconciled[/red]: see the rows marked MISMATCH")
    return 0 if result.ok else 1
