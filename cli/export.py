"""`fareway export --period 2026-11 --format csv|jsonl|focus`: a month's chargeback."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from rich.console import Console

from accounting.exports import FORMATS, charge_rows, period, render
from accounting.ledger import Ledger
from fareway.config import RedisConfig
from fareway.redis.embedded import redis_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--period", required=True, type=period, help="the billing month, e.g. 2026-11")
    parser.add_argument("--format", choices=FORMATS, default="csv",
                        help="csv or jsonl (our columns), or focus (FinOps FOCUS 1.2) (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="write here instead of standard output")
    parser.add_argument("--no-idle", dest="idle", action="store_false", help="leave out idle device time")


async def _export(args: argparse.Namespace) -> str:
    async with redis_session(RedisConfig.from_env()) as redis:
        rows = await charge_rows(Ledger(redis), args.period, idle=args.idle)
    return render(rows, args.period, args.format)


def run(args: argparse.Namespace) -> int:
    text = asyncio.run(_export(args))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        Console(stderr=True).print(f"wrote {args.output}")
    return 0


