"""`fareway budget`: set, list and delete monthly budgets (an admin's tool: accounting/admin.py, as the
AccountingService's budget RPCs, on Redis directly)."""

from __future__ import annotations

import argparse
import asyncio
import time

from rich.console import Console
from rich.table import Table

from accounting.admin import Admin
from fareway.config import RedisConfig
from fareway.quota import BASES, month_of
from fareway.redis.embedded import redis_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    put = sub.add_parser("set", help="set a team's (or one of its projects') monthly budget")
    put.add_argument("--team", required=True)
    put.add_argument("--project", default="", help="budget one project (default: the whole team)")
    put.add_argument("--hard", type=float, default=None, metavar="USD",
                     help="requests that could take the month's spend past this are refused")
    put.add_argument("--soft", type=float, default=None, metavar="USD", help="passing this records an alert")
    put.add_argument("--basis", choices=BASES, default="list",
                     help="what counts as spend: list price or cost to serve (default: %(default)s)")
    show = sub.add_parser("list", help="a team's budgets, this month's spend, held reservations and alerts")
    show.add_argument("--team", required=True)
    delete = sub.add_parser("delete", help="remove a budget")
    delete.add_argument("--team", required=True)
    delete.add_argument("--project", default="")


def _usd(value: float | int | None, nano: bool = False) -> str:
    if value is None:
        return "-"
    return f"${value / 1e9:,.6f}" if nano else f"${value:,.2f}"


async def _run(args: argparse.Namespace, console: Console) -> int:
    async with redis_session(RedisConfig.from_env()) as redis:
        admin = Admin(redis)
        if args.action == "set":
            budget = (await admin.set_budget(args.team, args.project, args.hard, args.soft, args.basis)).budget
            console.print(f"budget for {budget.scope} of {args.team}: hard {_usd(args.hard)}, "
                          f"soft {_usd(args.soft)} a month ({args.basis} basis)", highlight=False)
        elif args.action == "delete":
            if not await admin.delete_budget(args.team, args.project):
                console.print(f"no such budget for {args.team} {args.project}".rstrip())
                return 1
        else:
            statuses = await admin.list_budgets(args.team)
            month = statuses[0].month if statuses else month_of(time.time())
            table = Table("scope", "basis", "hard", "soft", f"spent {month}", "held by running requests",
                          title=f"budgets of {args.team}", title_justify="left")
            for status in statuses:
                b = status.budget
                table.add_row(b.scope, b.basis, _usd(b.hard_usd), _usd(b.soft_usd),
                              _usd(status.spent_nusd, nano=True), _usd(status.reserved_nusd, nano=True))
            Console().print(table)
            for alert in await admin.budget_alerts(args.team):
                Console().print(f"alert {alert['month']}: {alert['scope']} passed its soft budget "
                                f"({_usd(int(alert['spent_nusd']), nano=True)} spent)", highlight=False)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, Console(stderr=True)))
