"""`fareway limits`: set, list and delete rate limits and fair shares per team and project (an admin's
tool: accounting/admin.py, as the AccountingService's limits RPCs, on Redis directly). Gateways pick a
change up within their cache's lifetime (5 s)."""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console
from rich.table import Table

from accounting.admin import Admin
from fareway.config import RedisConfig
from fareway.quota import Limits
from fareway.redis.embedded import redis_session

_FLAGS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "concurrent": "max_concurrent_requests",
          "weight": "weight", "priority": "priority"}
"""--flag -> the limit it sets."""
CLEAR = "none"


def _number(kind: type[int] | type[float]):  # noqa: ANN202 - argparse's type
    def parse(text: str) -> int | float | str:
        if text.strip().lower() == CLEAR:
            return CLEAR
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r} (or {CLEAR!r} to clear it)") from None
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    put = sub.add_parser("set", help="change a team's (or one of its projects') limits; those not given stay as "
                                     f"they were, and {CLEAR!r} clears one")
    put.add_argument("--team", required=True)
    put.add_argument("--project", default="", help="limit one project (default: the whole team)")
    put.add_argument("--rpm", type=_number(int), default=None, metavar="N", help="requests per minute")
    put.add_argument("--tpm", type=_number(int), default=None, metavar="N",
                     help="prompt + completion tokens per minute")
    put.add_argument("--concurrent", type=_number(int), default=None, metavar="N", help="requests running at once")
    put.add_argument("--weight", type=_number(float), default=None, metavar="W",
                     help="share of saturated workers relative to other tenants (default 1)")
    put.add_argument("--priority", type=_number(int), default=None, metavar="P",
                     help="requests waiting for saturated workers run before those of lower priorities (default 0)")
    show = sub.add_parser("list", help="limits of one team, or of every team")
    show.add_argument("--team", default=None)
    delete = sub.add_parser("delete", help="remove a team's (or a project's) limits")
    delete.add_argument("--team", required=True)
    delete.add_argument("--project", default="")


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:,}"


def _changes(args: argparse.Namespace) -> dict[str, int | float | None]:
    """The flags given, as limits to change (None: clear it)."""
    return {name: None if getattr(args, flag) == CLEAR else getattr(args, flag)
            for flag, name in _FLAGS.items() if getattr(args, flag) is not None}


def _describe(x: Limits) -> str:
    return (f"limits of {x.team} {x.scope}: {_value(x.requests_per_minute)} requests/min, "
            f"{_value(x.tokens_per_minute)} tokens/min, {_value(x.max_concurrent_requests)} concurrent, "
            f"weight {_value(x.weight)}, priority {_value(x.priority)}")


async def _run(args: argparse.Namespace, console: Console) -> int:
    async with redis_session(RedisConfig.from_env()) as redis:
        admin = Admin(redis)
        if args.action == "set":
            console.print(_describe(await admin.set_limits(args.team, args.project, _changes(args))), highlight=False)
        elif args.action == "delete":
            if not await admin.delete_limits(args.team, args.project):
                console.print(f"no limits for {args.team} {args.project}".rstrip())
                return 1
        else:
            table = Table("team", "scope", "requests/min", "tokens/min", "concurrent", "weight", "priority",
                          title="rate limits and fair shares", title_justify="left")
            for x in await admin.list_limits(args.team):
                table.add_row(x.team, x.scope, _value(x.requests_per_minute), _value(x.tokens_per_minute),
                              _value(x.max_concurrent_requests), _value(x.weight), _value(x.priority))
            Console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, Console(stderr=True)))
