"""`fareway limits`: set, list and delete rate limits and fair shares per team and project (an admin's tool;
talks to Redis directly). Gateways pick a change up within their cache's lifetime (5 s)."""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console
from rich.table import Table

from fareway.config import RedisConfig
from fareway.quota import Limits, LimitStore
from fareway.redis.embedded import redis_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    put = sub.add_parser("set", help="set a team's (or one of its projects') limits, replacing earlier ones")
    put.add_argument("--team", required=True)
    put.add_argument("--project", default="", help="limit one project (default: the whole team)")
    put.add_argument("--rpm", type=int, default=None, metavar="N", help="requests per minute")
    put.add_argument("--tpm", type=int, default=None, metavar="N", help="prompt + completion tokens per minute")
    put.add_argument("--concurrent", type=int, default=None, metavar="N", help="requests running at once")
    put.add_argument("--weight", type=float, default=None, metavar="W",
                     help="share of saturated workers relative to other tenants (default 1)")
    put.add_argument("--priority", type=int, default=None, metavar="P",
                     help="requests waiting for saturated workers run before those of lower priorities (default 0)")
    show = sub.add_parser("list", help="limits of one team, or of every team")
    show.add_argument("--team", default=None)
    delete = sub.add_parser("delete", help="remove a team's (or a project's) limits")
    delete.add_argument("--team", required=True)
    delete.add_argument("--project", default="")


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:,}"


async def _run(args: argparse.Namespace, console: Console) -> int:
    async with redis_session(RedisConfig.from_env()) as redis:
        store = LimitStore(redis)
        if args.action == "set":
            limits = Limits(args.team, args.project, args.rpm, args.tpm, args.concurrent, args.weight, args.priority)
            await store.set(limits)
            console.print(f"limits of {args.team} {limits.scope}: {_value(args.rpm)} requests/min, "
                          f"{_value(args.tpm)} tokens/min, {_value(args.concurrent)} concurrent, "
                          f"weight {_value(args.weight)}, priority {_value(args.priority)}", highlight=False)
        elif args.action == "delete":
            if not await store.delete(args.team, args.project):
                console.print(f"no limits for {args.team} {args.project}".rstrip())
                return 1
        else:
            teams = [args.team] if args.team else await store.teams()
            table = Table("team", "scope", "requests/min", "tokens/min", "concurrent", "weight", "priority",
                          title="rate limits and fair shares", title_justify="left")
            for team in teams:
                for x in await store.list(team):
                    table.add_row(team, x.scope, _value(x.requests_per_minute), _value(x.tokens_per_minute),
                                  _value(x.max_concurrent_requests), _value(x.weight), _value(x.priority))
            Console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, Console(stderr=True)))
