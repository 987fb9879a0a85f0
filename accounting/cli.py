"""`fareway accounting`: serve usage reports over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging

from fareway.config import RedisConfig, TelemetryConfig
from fareway.process import wait_for_shutdown_signal
from fareway.tasks import stop_task

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50053", help="address to serve on (default: %(default)s)")
    parser.add_argument("--reservation-max-age", type=float, default=3600.0, metavar="SECONDS",
                        help="budget reservations older than this are released: their gateway died before "
                             "recording the request (default: %(default)s)")


async def serve(listen: str, redis_config: RedisConfig, reservation_max_age_s: float) -> None:
    from accounting.service import create_accounting_server, sweep_stale_reservations
    from fareway.redis import connect
    from fareway.redis.embedded import resolve_url

    with resolve_url(redis_config) as url:
        redis = connect(url)
        server = await create_accounting_server(redis, listen)
        sweeper = asyncio.create_task(sweep_stale_reservations(redis, reservation_max_age_s))
        log.info("accounting listening on port %d", server.port)
        try:
            await wait_for_shutdown_signal()
        finally:
            await stop_task(sweeper)
            await server.stop()
            await redis.aclose()


def run(args: argparse.Namespace) -> int:
    from fareway.telemetry import setup_telemetry

    setup_telemetry(TelemetryConfig.from_env("fareway-accounting"))
    asyncio.run(serve(args.listen, RedisConfig.from_env(), args.reservation_max_age))
    return 0
