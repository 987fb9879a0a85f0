"""Configuration of a worker in front of an OpenAI-compatible engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fareway.tls import ServerTls
from workers.config import default_worker_id


@dataclass(frozen=True)
class UpstreamConfig:
    upstream: str
    """The engine's OpenAI-compatible base URL, e.g. http://vllm:8000/v1."""
    model: str
    """The model's name at the engine (what its /v1/models lists)."""
    hardware_class: str
    """What the engine's devices are priced as: "nvidia-h100", "amd-mi300x", "cpu", ..."""
    device_count: int = 1
    """Devices the engine's replica runs on: its wall time counts this many times."""
    served_model_name: str | None = None
    """The name gateways route by; None: `model`."""
    tokenizer_path: Path | None = None
    """The model's .gguf file or Hugging Face folder (weights unread): counts tokens when the engine
    reports none, answers CountTokens, and gives the meter the model's shape. None: without them."""
    context_length: int | None = None
    """The engine's context length; None: from the engine's /v1/models (vLLM's max_model_len), else the
    tokenizer's model config, else 0 (unknown)."""
    kv_capacity_tokens: int = 0
    """Tokens the engine's KV cache holds (vLLM logs it at start as its KV cache size); prefix-affinity
    routing weighs homes by it. 0: unknown, and the worker is a home only when no worker with a known
    capacity has room."""
    max_num_seqs: int = 64
    """How many requests the engine runs at once, as gateways count its capacity for fair queueing."""
    tensor_parallel_size: int = 1
    metrics_url: str | None = None
    """The engine's Prometheus metrics (vLLM's /metrics): GetLoad reads queue depth and KV-cache usage there."""
    api_key: str | None = None
    """Sent to the engine as a bearer token."""
    forward_cache_salt: bool = False
    """Send the tenant's cache_salt (vLLM's prefix-cache isolation); off for engines that refuse it."""
    listen: str = "127.0.0.1:50052"
    advertise_address: str | None = None
    drain_timeout_s: float = 30.0
    worker_id: str = field(default_factory=default_worker_id)
    default_max_tokens: int = 256
    tls: ServerTls | None = None

    def __post_init__(self) -> None:
        if not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"--upstream must be an http:// or https:// URL, got {self.upstream!r}")
        if not self.model:
            raise ValueError("the upstream engine's model name is empty")
        if not self.hardware_class:
            raise ValueError("--hardware-class is required: it prices the engine's device time")
        if self.device_count < 1:
            raise ValueError(f"device_count must be at least 1, got {self.device_count}")
        if self.kv_capacity_tokens < 0:
            raise ValueError(f"kv_capacity_tokens must be >= 0, got {self.kv_capacity_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
