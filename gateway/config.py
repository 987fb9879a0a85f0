"""Configuration of a gateway process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fareway.tls import ChannelTls, ServerTls
from gateway.fairness import FairnessConfig
from gateway.routing import DEFAULT_POLICY, POLICIES


@dataclass(frozen=True)
class JournalConfig:
    """The journal of runs in flight and its sweeper (gateway/journal.py)."""

    ttl_s: float = 15.0
    """How long a gateway's liveness outlasts its last renewal: a gateway silent that long is gone."""
    sweep_interval_s: float = 5.0
    unknown_grace_s: float = 30.0
    """How old a run must be before "no worker knows it" means it never ran (a request on its way to
    its worker is not known there yet)."""
    give_up_s: float = 600.0
    """How long a run whose workers cannot be asked stays in the journal before it is released."""

    def __post_init__(self) -> None:
        if not 0 < self.sweep_interval_s < self.ttl_s:
            raise ValueError(f"journal sweep_interval_s must be above 0 and below ttl_s ({self.ttl_s}), "
                             f"got {self.sweep_interval_s}")


@dataclass(frozen=True)
class GatewayConfig:
    workers: tuple[str, ...]
    """Configured worker addresses (host:port); may be empty when the registry is watched."""
    listen: str = "127.0.0.1:50051"
    http_listen: str | None = None
    """Also serve the OpenAI-compatible HTTP edge on this HOST:PORT (gateway/http_edge.py); None: gRPC only."""
    http_max_body_bytes: int = 8 << 20
    """The largest HTTP request body taken (413 past it)."""
    worker_refresh_interval_s: float = 2.0
    """How often each worker's model info is re-read (and unreachable workers retried)."""
    registry: bool = False
    """Also dispatch to the workers registered in Redis (fareway/registry.py)."""
    registry_poll_interval_s: float = 1.0
    """How often the registry is re-read (workers joining and leaving, their load)."""
    routing: str = DEFAULT_POLICY
    """The routing policy of every model not in `routing_by_model` (gateway/routing.py)."""
    routing_by_model: tuple[tuple[str, str], ...] = ()
    """(model, policy) pairs overriding `routing` for those models."""
    shared_prefix_homes: bool = True
    """prefix-affinity homes agreed with the other gateway replicas through Redis
    (gateway/shared_homes.py), rather than each replica's own."""
    max_attempts: int = 3
    """Workers tried for one request before its first token, when one cannot be reached."""
    idempotency_ttl_s: int = 24 * 3600
    """How long a request_id's outcome is kept for replays."""
    idempotency_lease_s: int = 15 * 60
    """How long a request_id stays claimed by a run that never reports back (a crashed gateway)."""
    spool_dir: Path | None = None
    """Where usage records wait while Redis is unreachable (replayed when it is back); None: no spool,
    and a record that cannot be written fails its request."""
    budget_cost_reserve_usd_per_million_tokens: float = 10.0
    """What a cost-to-serve budget holds per token of a running request (list-price budgets hold exact bounds)."""
    tls: ServerTls | None = None
    """Serve the public port over TLS (mutual TLS with a client CA); None: plaintext."""
    worker_tls: ChannelTls | None = None
    """Call workers over TLS (presenting a client certificate for workers that require mutual TLS)."""
    key_cache_ttl_s: float = 5.0
    """How long a valid API key is remembered without asking Redis (a revocation takes this long to apply)."""
    limits_cache_ttl_s: float = 5.0
    """How long a team's rate limits are cached before they are read again (a change takes this long to apply)."""
    fairness: FairnessConfig | None = FairnessConfig()
    journal: JournalConfig = JournalConfig()
    """Past its workers' capacity, hold requests at the gateway and serve them fairly across tenants;
    None: send every request on at once (the workers queue them first come, first served)."""

    def __post_init__(self) -> None:
        if not self.workers and not self.registry:
            raise ValueError("a gateway needs at least one worker address, or the registry")
        for policy in (self.routing, *(p for _, p in self.routing_by_model)):
            if policy not in POLICIES:
                raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")
        if self.registry_poll_interval_s <= 0:
            raise ValueError(f"registry_poll_interval_s must be positive, got {self.registry_poll_interval_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.budget_cost_reserve_usd_per_million_tokens < 0:
            raise ValueError("budget_cost_reserve_usd_per_million_tokens must be >= 0")
        if self.key_cache_ttl_s < 0:
            raise ValueError(f"key_cache_ttl_s must be >= 0, got {self.key_cache_ttl_s}")
        if self.limits_cache_ttl_s < 0:
            raise ValueError(f"limits_cache_ttl_s must be >= 0, got {self.limits_cache_ttl_s}")
        if self.http_max_body_bytes < 1024:
            raise ValueError(f"http_max_body_bytes must be at least 1024, got {self.http_max_body_bytes}")
        if self.worker_refresh_interval_s <= 0:
            raise ValueError(f"worker_refresh_interval_s must be positive, got {self.worker_refresh_interval_s}")
