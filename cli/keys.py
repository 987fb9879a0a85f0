"""`fareway keys`: create, list and revoke API keys (accounting/admin.py, as the AccountingService's
key RPCs; on Redis directly)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt

from rich.console import Console
from rich.table import Table

from accounting.admin import Admin
from fareway.auth import KeyInfo, Role
from fareway.config import RedisConfig
from fareway.errors import FarewayError
from fareway.redis.embedded import redis_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("--team", required=True)
    create.add_argument("--project", required=True)
    create.add_argument("--admin", action="store_true", help="an admin key: may read every team's usage")
    sub.add_parser("list", help="list keys (their ids, never the keys)")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")


async def _run(args: argparse.Namespace, console: Console) -> None:
    async with redis_session(RedisConfig.from_env()) as redis:
        admin = Admin(redis)
        if args.action == "create":
            key, info = await admin.create_key(args.team, args.project, Role.ADMIN if args.admin else Role.TENANT)
            console.print(f"created {info.role.value} key {info.key_id} for {info.team}/{info.project}; "
                          "it is shown only once:", highlight=False)
            print(key)
        elif args.action == "list":
            # The list is the command's output (stdout); notes and errors go to stderr.
            Console().print(_keys_table(await admin.list_keys()))
        else:
            info = await admin.revoke_key(args.key_id)
            console.print(f"revoked key {info.key_id} ({info.team}/{info.project})")


def _keys_table(infos: list[KeyInfo]) -> Table:
    table = Table("key id", "team", "project", "role", "created", "status")
    for info in infos:
        created = dt.datetime.fromtimestamp(info.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        table.add_row(info.key_id, info.team, info.project, info.role.value, created,
                      "revoked" if info.revoked_at else "active")
    return table


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        asyncio.run(_run(args, console))
    except FarewayError as error:
        console.print(f"[red]error:[/red] {error.message}")
        return 1
    return 0
