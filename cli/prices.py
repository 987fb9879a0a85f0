"""`fareway prices`: load a price book version, or show the one in force (accounting/admin.py)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path

from rich.console import Console
from rich.table import Table

from accounting.admin import Admin
from accounting.pricebook import PriceBook
from fareway.config import RedisConfig
from fareway.redis.embedded import redis_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    load = sub.add_parser("load", help="make a price book file (TOML) the version in force")
    load.add_argument("file", type=Path)
    sub.add_parser("show", help="the prices in force, with their history")


def _when(instant: float) -> str:
    return dt.datetime.fromtimestamp(instant, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _table(book: PriceBook) -> tuple[Table, Table]:
    hardware = Table("hardware class", "USD per device-hour", "from", title=f"price book {book.version}",
                     title_justify="left")
    for p in sorted(book.hardware, key=lambda p: (p.hardware_class, p.effective_from)):
        hardware.add_row(p.hardware_class, f"{p.usd_per_device_hour:g}", _when(p.effective_from))
    models = Table("model", "USD per 1M prompt", "cached prompt", "completion", "from")
    for p in sorted(book.models, key=lambda p: (p.model, p.effective_from)):
        models.add_row(p.model, f"{p.usd_per_million_prompt_tokens:g}", f"{p.usd_per_million_cached_prompt_tokens:g}",
                       f"{p.usd_per_million_completion_tokens:g}", _when(p.effective_from))
    return hardware, models


async def _run(args: argparse.Namespace) -> int:
    async with redis_session(RedisConfig.from_env()) as redis:
        admin = Admin(redis)
        if args.action == "load":
            book = PriceBook.load(args.file)
            await admin.load_prices(book)
            Console(stderr=True).print(f"price book {book.version} is in force")
            return 0
        for table in _table(await admin.prices_in_force()):
            Console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
