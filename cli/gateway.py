"""`fareway gateway`: serve the public API in front of workers."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from cli.options import add_channel_arguments, add_server_arguments, channel_tls_from_args, server_tls_from_args
from fareway.config import DEFAULT_DATA_DIR, RedisConfig, TelemetryConfig
from fareway.telemetry import setup_telemetry
from gateway.config import GatewayConfig, JournalConfig
from gateway.fairness import FairnessConfig
from gateway.routing import DEFAULT_POLICY, POLICIES
from gateway.service import serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50051", help="address to serve on (default: %(default)s)")
    parser.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                        help="also serve the OpenAI-compatible HTTP edge (/v1/chat/completions, /v1/completions, "
                             "/v1/models) here, e.g. 0.0.0.0:8080 (default: not served)")
    parser.add_argument("--http-max-body", type=int, default=8 << 20, metavar="BYTES",
                        help="the largest HTTP request body taken (default: %(default)s)")
    parser.add_argument("--worker", action="append", default=None, metavar="HOST:PORT",
                        help="a worker to dispatch to; repeat for several "
                             "(default: $FAREWAY_WORKERS, comma-separated; without them and without the "
                             "registry, 127.0.0.1:50052)")
    parser.add_argument("--registry", action=argparse.BooleanOptionalAction, default=None,
                        help="also dispatch to the workers registered in Redis (default: on when REDIS_URL is "
                             "set and no worker address is given)")
    parser.add_argument("--routing", action="append", default=None, metavar="[MODEL=]POLICY",
                        help=f"routing policy: {', '.join(POLICIES)}; MODEL=POLICY sets one model's "
                             f"(repeatable; default: {DEFAULT_POLICY})")
    parser.add_argument("--shared-prefix-homes", action=argparse.BooleanOptionalAction, default=True,
                        help="prefix-affinity: agree each prompt prefix's home worker with the other gateway "
                             "replicas through Redis; --no-shared-prefix-homes keeps this replica's own (default: on)")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="workers tried per request before its first token (default: %(default)s)")
    parser.add_argument("--spool-dir", type=Path, default=None,
                        help="where usage records wait while Redis is unreachable "
                             "(default: $FAREWAY_DATA_DIR/spool, i.e. var/spool)")
    add_server_arguments(parser, "the public InferenceService")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve OpenTelemetry metrics in Prometheus format on this port (default: not served)")
    add_channel_arguments(parser, "worker-", "the workers")
    parser.add_argument("--budget-cost-reserve", type=float, default=10.0, metavar="USD_PER_1M_TOKENS",
                        help="what a cost-to-serve budget holds per token of a running request "
                             "(default: %(default)s)")
    parser.add_argument("--key-cache", type=float, default=5.0, metavar="SECONDS",
                        help="how long a valid API key is remembered; a revocation applies within this "
                             "(default: %(default)s; 0 asks Redis on every request)")
    parser.add_argument("--limits-cache", type=float, default=5.0, metavar="SECONDS",
                        help="how long a team's rate limits are cached; a change applies within this "
                             "(default: %(default)s)")
    parser.add_argument("--fairness", action=argparse.BooleanOptionalAction, default=True,
                        help="past the workers' capacity, hold requests at the gateway and serve them fairly across "
                             "tenants (Virtual Token Counter, weights and priorities from `fareway limits`); "
                             "--no-fairness sends every request on at once (default: on)")
    parser.add_argument("--fair-capacity", type=float, default=1.0, metavar="FACTOR",
                        help="requests let through per model: FACTOR x the up workers' max_num_seqs (default: %(default)s)")
    parser.add_argument("--fair-share", choices=("team", "project"), default="team",
                        help="share fairly among teams, or among team/project pairs (default: %(default)s)")
    parser.add_argument("--fair-token-weights", type=float, nargs=2, default=(1.0, 2.0), metavar=("PROMPT", "COMPLETION"),
                        help="service counted per prompt and per completion token (default: 1 2)")
    parser.add_argument("--fair-sync-interval", type=float, default=0.25, metavar="SECONDS",
                        help="how often the fair-share counters are synced with the other gateway replicas through "
                             "Redis; 0 counts this replica's service alone (default: %(default)s)")
    parser.add_argument("--journal-ttl", type=float, default=JournalConfig.ttl_s, metavar="SECONDS",
                        help="a gateway silent this long is gone, and the gateways left settle the runs it journaled "
                             "(default: %(default)s)")
    parser.add_argument("--journal-sweep-interval", type=float, default=JournalConfig.sweep_interval_s,
                        metavar="SECONDS", help="how often this gateway renews its liveness and sweeps the journals "
                                                "of gateways gone (default: %(default)s)")


def _workers(args: argparse.Namespace, registry: bool) -> tuple[str, ...]:
    if args.worker:
        return tuple(args.worker)
    listed = tuple(w.strip() for w in os.environ.get("FAREWAY_WORKERS", "").split(",") if w.strip())
    return listed or (() if registry else ("127.0.0.1:50052",))


def _use_registry(args: argparse.Namespace) -> bool:
    if args.registry is not None:
        return args.registry
    return bool(os.environ.get("REDIS_URL")) and not args.worker and not os.environ.get("FAREWAY_WORKERS")


def _routing(args: argparse.Namespace) -> tuple[str, tuple[tuple[str, str], ...]]:
    """--routing values -> (the default policy, (model, policy) overrides)."""
    default, by_model = DEFAULT_POLICY, []
    for item in args.routing or ():
        model, _, policy = item.rpartition("=")
        if policy not in POLICIES:
            raise SystemExit(f"--routing: unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if model:
            by_model.append((model, policy))
        else:
            default = policy
    return default, tuple(by_model)


def run(args: argparse.Namespace) -> int:
    setup_telemetry(TelemetryConfig.from_env("fareway-gateway", args.metrics_port))
    spool_dir = args.spool_dir or Path(os.environ.get("FAREWAY_DATA_DIR", DEFAULT_DATA_DIR)) / "spool"
    registry = _use_registry(args)
    routing, routing_by_model = _routing(args)
    config = GatewayConfig(workers=_workers(args, registry), registry=registry, routing=routing,
                           routing_by_model=routing_by_model, shared_prefix_homes=args.shared_prefix_homes,
                           listen=args.listen, http_listen=args.http_listen, http_max_body_bytes=args.http_max_body,
                           max_attempts=args.max_attempts,
                           spool_dir=spool_dir, budget_cost_reserve_usd_per_million_tokens=args.budget_cost_reserve,
                           tls=server_tls_from_args(args), worker_tls=channel_tls_from_args(args, "worker-"),
                           limits_cache_ttl_s=args.limits_cache, key_cache_ttl_s=args.key_cache, fairness=FairnessConfig(
                               capacity_factor=args.fair_capacity, prompt_token_weight=args.fair_token_weights[0],
                               completion_token_weight=args.fair_token_weights[1],
                               by_project=args.fair_share == "project", sync_interval_s=args.fair_sync_interval)
                           if args.fairness else None,
                           journal=JournalConfig(ttl_s=args.journal_ttl, sweep_interval_s=args.journal_sweep_interval))
    asyncio.run(serve(config, RedisConfig.from_env()))
    return 0
