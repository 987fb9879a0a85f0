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
    """A redis:// or unix:// URL; None starts (or reuses) the embedded server under data_dir."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Holds the embedded server's socket and its append-only file."""

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {self.url!r}")

    @property
    def embedded_socket(self) -> Path:
        return self.data_dir.resolve() / "redis.sock"

    @classmethod
    def from_env(cls, data_dir: Path | None = None) -> RedisConfig:
        data = data_dir or Path(os.environ.get("FAREWAY_DATA_DIR", DEFAULT_DATA_DIR))
        return cls(url=os.environ.get("REDIS_URL") or None, data_dir=data)


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry tracing."""

    service_name: str
    exporter: str = "none"
    """"none" or "console" (spans printed as JSON to stderr)."""

    def __post_init__(self) -> None:
        if self.exporter not in ("none", "console"):
            raise ValueError(f"telemetry exporter must be 'none' or 'console', got {self.exporter!r}")

    @classmethod
    def from_env(cls, service_name: str) -> TelemetryConfig:
        return cls(service_name=service_name, exporter=os.environ.get("FAREWAY_TRACES", "none"))
