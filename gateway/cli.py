"""`fareway gateway`: serve the public API in front of workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from fareway.config import DEFAULT_DATA_DIR, RedisConfig, TelemetryConfig
from fareway.process import wait_for_shutdown_signal

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50051", help="address to serve on (default: %(default)s)")
    parser.add_argument("--worker", action="append", default=None, metavar="HOST:PORT",
                        help="a worker to dispatch to; repeat for several "
                             "(default: $FAREWAY_WORKERS, comma-separated, or 127.0.0.1:50052)")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="workers tried per request before its first token (default: %(default)s)")
    parser.add_argument("--spool-dir", type=Path, default=None,
                        help="where usage records wait while Redis is unreachable "
                             "(default: $FAREWAY_DATA_DIR/spool, i.e. var/spool)")
    parser.add_argument("--budget-cost-reserve", type=float, default=10.0, metavar="USD_PER_1M_TOKENS",
                        help="what a cost-to-serve budget holds per token of a running request "
                             "(default: %(default)s)")
    parser.add_argument("--limits-cache", type=float, default=5.0, metavar="SECONDS",
                        help="how long a team's rate limits are cached; a change applies within this "
                             "(default: %(default)s)")


def _workers(args: argparse.Namespace) -> tuple[str, ...]:
    if args.worker:
        return tuple(args.worker)
    return tuple(w.strip() for w in os.environ.get("FAREWAY_WORKERS", "127.0.0.1:50052").split(",") if w.strip())


async def serve(config, redis_config: RedisConfig) -> None:  # noqa: ANN001 - GatewayConfig
    from fareway.redis_store import connect, resolve_url
    from gateway.service import running_gateway

    with resolve_url(redis_config) as url:
        redis = connect(url)
        try:
            async with running_gateway(config, redis) as server:
                log.info("gateway listening on port %d, workers: %s", server.port, ", ".join(config.workers))
                await wait_for_shutdown_signal()
        finally:
            await redis.aclose()


def run(args: argparse.Namespace) -> int:
    from fareway.telemetry import setup_telemetry
    from gateway.config import GatewayConfig

    setup_telemetry(TelemetryConfig.from_env("fareway-gateway"))
    spool_dir = args.spool_dir or Path(os.environ.get("FAREWAY_DATA_DIR", DEFAULT_DATA_DIR)) / "spool"
    config = GatewayConfig(workers=_workers(args), listen=args.listen, max_attempts=args.max_attempts,
                           spool_dir=spool_dir, budget_cost_reserve_usd_per_million_tokens=args.budget_cost_reserve,
                           limits_cache_ttl_s=args.limits_cache)
    asyncio.run(serve(config, RedisConfig.from_env()))
    return 0
