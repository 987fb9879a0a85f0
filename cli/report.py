"""`fareway report`: usage per group, read from the ledger in Redis."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import re
import sys
from decimal import Decimal
from pathlib import Path

from rich.console import Console

from accounting.ledger import Ledger
from accounting.reports import DIMENSIONS, IDLE_MODES, UsageReport, usage_report
from accounting.rollups import Totals
from cli.chart import cost_chart
from cli.render import USAGE_COLUMNS, totals_table, usage_blocks
from fareway.config import RedisConfig
from fareway.errors import FarewayError
from fareway.redis import connect
from fareway.redis.embedded import resolve_url

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """An ISO date or time (UTC unless it says otherwise), or an age such as 24h or 7d -> unix seconds."""
    match = _RELATIVE.match(text)
    if match:
        base = dt.datetime.now(dt.UTC).timestamp() if now is None else now
        return base - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use 2026-11-24, 2026-11-24T09:00 or 24h)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--by", default="team,project,model",
                        help=f"comma-separated dimensions: {', '.join(DIMENSIONS)} (default: %(default)s)")
    parser.add_argument("--since", type=parse_time, default=None, help="start (inclusive): a date, a time or an age")
    parser.add_argument("--until", type=parse_time, default=None, help="end (exclusive)")
    parser.add_argument("--team", action="append", default=None, help="only this team; repeat for several")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--chart", type=Path, default=None, metavar="FILE.png",
                        help="also draw cost per team per day (a stacked bar chart) into this PNG file")
    parser.add_argument("--idle", choices=IDLE_MODES, default="separate",
                        help="workers' idle device time, with all teams only: as rows of team (unallocated), shared "
                             "over the rows by cost, or left out (default: %(default)s)")


def _figures(totals: Totals) -> list[object]:
    return [getattr(totals, name) for name in USAGE_COLUMNS]


def _plain(value: object) -> object:
    """A figure for CSV and JSON: money as its exact decimal string, rates rounded."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return round(value, 9)
    return value


def write_report(report: UsageReport, fmt: str, out=None) -> None:  # noqa: ANN001 - a text stream
    out = out or sys.stdout
    if fmt == "table":
        rows = [(group, _figures(totals)) for group, totals in report.rows]
        console = Console(file=out)
        table = totals_table("usage", report.group_by, rows, _figures(report.total))
        natural = console.measure(table, options=console.options.update_width(10_000)).maximum
        if natural > console.width:  # the table would cut every cell to a letter or two
            console.print(usage_blocks("usage", report.group_by, rows, _figures(report.total)))
        else:
            console.print(table)
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*report.group_by, *USAGE_COLUMNS])
        for group, totals in report.rows:
            writer.writerow([*group, *map(_plain, _figures(totals))])
    else:
        rows = [{**dict(zip(report.group_by, group)), **dict(zip(USAGE_COLUMNS, map(_plain, _figures(totals))))}
                for group, totals in report.rows]
        json.dump({"rows": rows, "total": dict(zip(USAGE_COLUMNS, map(_plain, _figures(report.total))))},
                  out, indent=2)
        out.write("\n")


async def _run(args: argparse.Namespace) -> UsageReport:
    group_by = [name.strip() for name in args.by.split(",") if name.strip()]
    with resolve_url(RedisConfig.from_env()) as url:
        redis = connect(url)
        try:
            return await usage_report(Ledger(redis), group_by, since=args.since, until=args.until, teams=args.team,
                                      idle=args.idle)
        finally:
            await redis.aclose()


def run(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_run(args))
        if args.chart is not None:
            chart_args = argparse.Namespace(**{**vars(args), "by": "day,team"})
            cost_chart(asyncio.run(_run(chart_args)), args.chart)
    except FarewayError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error.message}")
        return 2
    write_report(report, args.format)
    if args.chart is not None:
        Console(stderr=True).print(f"chart written to {args.chart}")
    return 0
