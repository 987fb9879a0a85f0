"""`fareway accounting`: serve usage reports, budgets, limits and keys over gRPC (the AccountingService)."""

from __future__ import annotations

import argparse
import asyncio

from accounting.service import serve
from fareway.config import RedisConfig, TelemetryConfig
from fareway.telemetry import setup_telemetry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50053", help="address to serve on (default: %(default)s)")
    parser.add_argument("--reservation-max-age", type=float, default=3600.0, metavar="SECONDS",
                        help="budget reservations older than this are released: their gateway died before "
                             "recording the request (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    setup_telemetry(TelemetryConfig.from_env("fareway-accounting"))
    asyncio.run(serve(args.listen, RedisConfig.from_env(), args.reservation_max_age))
    return 0
