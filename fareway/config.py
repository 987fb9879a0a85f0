"""Configuration shared by every service. Each concern is a frozen dataclass,
validated on construction; flags and environment variables are read only at
the entry points (the CLI)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("var")


@dataclass(frozen=True)
class RedisConfig:
    """Where the shared state lives."""

    url: str | None = None
    """A redis://, rediss:// or unix:// URL (one server), or redis+cluster:// or rediss+cluster:// (a Redis
    Cluster: fareway/redis/__init__.py); None starts (or reuses) the embedded server under data_dir."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Holds the embedded server's socket and its append-only file."""

    def __post_init__(self) -> None:
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if self.url is not None and not self.url.startswith(schemes):
            # Never the URL itself: it may hold a password.
            raise ValueError(f"REDIS_URL must start with {', '.join(schemes)}, not "
                             f"{self.url.partition('://')[0][:20]!r}://...")

    @property
    def embedded_socket(self) -> Path:
        return self.data_dir.resolve() / "redis.sock"

    @classmethod
    def from_env(cls, data_dir: Path | None = None) -> RedisConfig:
        data = data_dir or Path(os.environ.get("FAREWAY_DATA_DIR", DEFAULT_DATA_DIR))
        return cls(url=os.environ.get("REDIS_URL") or None, data_dir=data)


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry traces and metrics."""

    service_name: str
    exporter: str = "none"
    """Spans: "none" or "console" (printed as JSON to stderr); OTLP whenever otlp_endpoint is set."""
    otlp_endpoint: str | None = None
    """An OpenTelemetry collector (e.g. http://otel-collector:4317): traces and metrics go there by OTLP/gRPC."""
    metrics_port: int | None = None
    """Serve metrics in Prometheus format on this port (0 picks a free one); None: not served."""

    def __post_init__(self) -> None:
        if self.exporter not in ("none", "console"):
            raise ValueError(f"telemetry exporter must be 'none' or 'console', got {self.exporter!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be a port number, got {self.metrics_port}")

    @classmethod
    def from_env(cls, service_name: str, metrics_port: int | None = None) -> TelemetryConfig:
        return cls(service_name=service_name, exporter=os.environ.get("FAREWAY_TRACES", "none"),
                   otlp_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None, metrics_port=metrics_port)
