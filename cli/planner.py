"""Capacity and cost planning (`fareway plan`): what one replica of a model holds on a hardware
class, in weights, KV cache and concurrent conversations, and what its tokens cost.

Memory per device, as the planner counts it:

    usable    = device memory x memory_utilization          (0.9 by default, vLLM's default)
    KV cache  = usable - weights - activation reserve      (the reserve: 1 GiB by default)

The activation reserve stands for what a step needs besides weights and KV cache: the
activations and logits of a chunked-prefill step, the allocator's slack, CUDA graphs. The
worker measures it on the device; a plan has to assume it.

Nothing here imports torch or reads tensors: a 70B plan is computed from the model's config.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accounting.pricebook import PriceBook
from workers.accelerators import hardware_class
from workers.models.config import LlamaConfig, RopeScaling
from workers.sizing import (
    KV_DTYPES,
    WEIGHT_DTYPES,
    kv_bytes_per_token,
    kv_capacity_tokens,
    max_concurrent_sequences,
    normalize_dtype,
    weight_bytes_per_rank,
)

GIB = 2**30
SECONDS_PER_HOUR = 3600
TOKENS_PER_MILLION = 10**6


@dataclass(frozen=True)
class HardwareSpec:
    """One hardware class: a device's memory and a price to fall back on."""

    hardware_class: str
    """As the worker names it (workers/accelerators.py): "nvidia-h100", "amd-mi300x", "cpu"."""
    memory_gib: float
    """Per device, the nominal capacity (an H100 80 GB shows CUDA about 79 GiB; memory_utilization's
    headroom covers the difference). For "cpu", the host's memory."""
    usd_per_device_hour: float
    """Used only when the price book has no price for the class."""

    def __post_init__(self) -> None:
        if self.memory_gib <= 0 or self.usd_per_device_hour < 0:
            raise ValueError(f"{self.hardware_class}: memory must be positive and the price not negative")


DEFAULT_CPU_MEMORY_GIB = 64.0
"""A CPU host's memory unless --memory-gib says otherwise: a fixed figure, so that a plan does
not depend on the machine it is computed on."""

HARDWARE: dict[str, HardwareSpec] = {spec.hardware_class: spec for spec in (
    HardwareSpec("nvidia-h100", 80, 2.49),
    HardwareSpec("nvidia-h200", 141, 3.49),
    HardwareSpec("nvidia-a100", 80, 1.29),
    HardwareSpec("amd-mi300x", 192, 2.19),
    HardwareSpec("nvidia-l4", 24, 0.71),
    HardwareSpec("cpu", DEFAULT_CPU_MEMORY_GIB, 0.10),
)}
"""Hardware classes the planner knows; prices as in accounting/prices/default.toml."""

_LLAMA_31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)

PRESETS: dict[str, LlamaConfig] = {
    # The published config.json of each model (the -Instruct variants have the same shapes).
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=_LLAMA_31_ROPE,
        max_position_embeddings=131072),
    "llama-3.1-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=_LLAMA_31_ROPE,
        max_position_embeddings=131072),
    "mistral-7b-v0.3": LlamaConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1_000_000.0, max_position_embeddings=32768),
    # Qwen2.5-72B-Instruct's config.json: 32k positions (128k takes YaRN, which the worker does not do).
    "qwen2.5-72b": LlamaConfig(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768,
        attention_bias=True),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100_000.0, max_position_embeddings=8192,
        tie_word_embeddings=True),
}
"""Well-known model shapes by lower-case name."""

PRESET_ALIASES: dict[str, str] = {"mistral-7b": "mistral-7b-v0.3"}


def resolve_model(spec: str) -> tuple[str, LlamaConfig]:
    """(name, config) of a model file or folder, or of a preset ("Llama-3.1-8B",
    "meta-llama/Llama-3.1-8B-Instruct"); ValueError listing the presets if it is neither.
    A file or folder is named as the worker would serve it: its name before the first ".",
    lower-cased."""
    path = Path(spec).expanduser()
    if path.exists():
        # numpy and gguf load only for a file: `fareway --help` builds every command's parser.
        from workers.models.config_files import read_model_config

        return path.name.split(".", 1)[0].lower(), read_model_config(path)
    key = spec.strip().lower().rsplit("/", 1)[-1].removesuffix("-instruct")
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown model {spec!r}: no such file or folder, and not a preset; "
                         f"presets: {', '.join(PRESETS)}")
    return key, PRESETS[key]


def resolve_hardware(name: str) -> str:
    """The hardware class of a name the worker would report or a person would type ("H100",
    "h100-80gb", "MI300X", "nvidia-l4"); ValueError listing the known classes."""
    key = name.strip().lower()
    if key not in HARDWARE:
        key = hardware_class(name, is_rocm=False)
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; choose one of: {', '.join(HARDWARE)}")
    return key


def auto_weight_dtype(hardware: str) -> str:
    """The weights' dtype when none is given, as the worker picks its compute dtype: fp32 on CPUs
    (bf16 matmuls are slow there), bf16 on accelerators."""
    return "fp32" if hardware == "cpu" else "bf16"


def auto_kv_dtype(weight_dtype: str, hardware: str) -> str:
    """The KV dtype when none is given: the compute dtype, i.e. the weights' dtype when it is a
    float, else what int8 weights compute in."""
    return auto_weight_dtype(hardware) if weight_dtype == "int8" else weight_dtype


@dataclass(frozen=True)
class Deployment:
    """One configuration of a replica: which devices, how many, and how weights and KV are stored."""

    hardware: str
    """A key of HARDWARE."""
    weight_dtype: str
    """One of workers.sizing.WEIGHT_DTYPES."""
    kv_dtype: str
    """One of workers.sizing.KV_DTYPES."""
    tensor_parallel_size: int = 1
    """Devices per replica."""

    def __post_init__(self) -> None:
        if self.hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {self.hardware!r}; choose one of: {', '.join(HARDWARE)}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unknown weight dtype {self.weight_dtype!r}; choose one of: {', '.join(WEIGHT_DTYPES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV cache dtype {self.kv_dtype!r}; choose one of: {', '.join(KV_DTYPES)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor parallel size must be at least 1, got {self.tensor_parallel_size}")

    @classmethod
    def from_names(cls, hardware: str, weights: str | None, kv: str | None,
                   tensor_parallel_size: int | str) -> Deployment:
        """A deployment from what a person typed: aliases accepted; weights or kv None (or "auto")
        chosen as the worker would (auto_weight_dtype, auto_kv_dtype)."""
        hardware_class_ = resolve_hardware(hardware)
        weight_dtype = (auto_weight_dtype(hardware_class_) if _is_auto(weights)
                        else normalize_dtype(weights, WEIGHT_DTYPES))
        kv_dtype = auto_kv_dtype(weight_dtype, hardware_class_) if _is_auto(kv) else normalize_dtype(kv, KV_DTYPES)
        return cls(hardware_class_, weight_dtype, kv_dtype, _whole_number(tensor_parallel_size, "tensor parallel size"))

    @property
    def label(self) -> str:
        return (f"{self.tensor_parallel_size} x {self.hardware}, weights {self.weight_dtype}, "
                f"KV {self.kv_dtype}")


@dataclass(frozen=True)
class PlanSettings:
    """What every deployment in a plan shares."""

    context_length_tokens: int = 4096
    """The conversation length (prompt and completion) that concurrency is counted in."""
    memory_utilization: float = 0.9
    """The share of each device's memory the worker may use."""
    activation_reserve_gib: float = 1.0
    """Per device, of the usable memory, kept for activations (see the module docstring)."""
    memory_gib_per_device: float | None = None
    """Overrides the hardware class's memory (a 40 GB A100, a CPU host); None keeps it."""
    block_size: int = 16
    """Tokens per KV block: sequences take whole blocks."""
    tokens_per_second: float | None = None
    """Measured or stated throughput of one replica; None leaves the price per token out."""

    def __post_init__(self) -> None:
        if self.context_length_tokens < 1:
            raise ValueError(f"context length must be at least 1 token, got {self.context_length_tokens}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory utilization must be in (0, 1], got {self.memory_utilization}")
        if self.activation_reserve_gib < 0:
            raise ValueError(f"activation reserve cannot be negative, got {self.activation_reserve_gib}")
        if self.memory_gib_per_device is not None and self.memory_gib_per_device <= 0:
            raise ValueError(f"device memory must be positive, got {self.memory_gib_per_device} GiB")
        if self.block_size < 1:
            raise ValueError(f"block size must be at least 1, got {self.block_size}")
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            raise ValueError(f"tokens per second must be positive, got {self.tokens_per_second}")


@dataclass(frozen=True)
class Plan:
    """What one deployment of a model holds and costs."""

    deployment: Deployment
    memory_bytes_per_device: int
    usable_bytes_per_device: int
    weight_bytes_per_device: int
    activation_reserve_bytes_per_device: int
    kv_cache_bytes_per_device: int
    kv_bytes_per_token_per_device: int
    kv_bytes_per_token_per_replica: int
    kv_capacity_tokens: int
    """Tokens the replica's KV pool holds, in whole blocks."""
    context_length_tokens: int
    max_concurrent_sequences: int
    """Conversations of context_length_tokens the pool holds at once."""
    usd_per_device_hour: float
    tokens_per_second: float | None

    @property
    def fits_weights(self) -> bool:
        """Weights and the activation reserve fit in each device's usable memory."""
        return self.weight_bytes_per_device + self.activation_reserve_bytes_per_device <= self.usable_bytes_per_device

    @property
    def fits_one_sequence(self) -> bool:
        """It fits, and the KV pool holds at least one conversation of the context length."""
        return self.fits_weights and self.max_concurrent_sequences >= 1

    @property
    def usd_per_replica_hour(self) -> float:
        return self.usd_per_device_hour * self.deployment.tensor_parallel_size

    @property
    def usd_per_million_tokens(self) -> float | None:
        """The replica's hourly price spread over the tokens it makes in an hour."""
        if self.tokens_per_second is None:
            return None
        return self.usd_per_replica_hour / (self.tokens_per_second * SECONDS_PER_HOUR) * TOKENS_PER_MILLION

    def to_dict(self) -> dict[str, Any]:
        """Every figure, derived ones included, for --json."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "deployment"}
        derived = {name: getattr(self, name) for name in ("fits_weights", "fits_one_sequence",
                                                          "usd_per_replica_hour", "usd_per_million_tokens")}
        return {**dataclasses.asdict(self.deployment), **fields, **derived}


def plan(config: LlamaConfig, deployment: Deployment, settings: PlanSettings, usd_per_device_hour: float) -> Plan:
    """What `deployment` of the model holds and costs under `settings`."""
    if settings.context_length_tokens > config.max_position_embeddings:
        raise ValueError(f"context length {settings.context_length_tokens} exceeds the model's "
                         f"{config.max_position_embeddings} tokens")
    tp = deployment.tensor_parallel_size
    memory_gib = settings.memory_gib_per_device or HARDWARE[deployment.hardware].memory_gib
    memory_bytes = int(memory_gib * GIB)
    usable_bytes = int(memory_bytes * settings.memory_utilization)
    weight_bytes = weight_bytes_per_rank(config, deployment.weight_dtype, tp)
    reserve_bytes = int(settings.activation_reserve_gib * GIB)
    kv_cache_bytes = max(usable_bytes - weight_bytes - reserve_bytes, 0)
    capacity = kv_capacity_tokens(kv_cache_bytes, config, deployment.kv_dtype, tp, settings.block_size)
    per_device = kv_bytes_per_token(config, deployment.kv_dtype, tp)
    return Plan(
        deployment=deployment,
        memory_bytes_per_device=memory_bytes,
        usable_bytes_per_device=usable_bytes,
        weight_bytes_per_device=weight_bytes,
        activation_reserve_bytes_per_device=reserve_bytes,
        kv_cache_bytes_per_device=kv_cache_bytes,
        kv_bytes_per_token_per_device=per_device,
        kv_bytes_per_token_per_replica=per_device * tp,
        kv_capacity_tokens=capacity,
        context_length_tokens=settings.context_length_tokens,
        max_concurrent_sequences=max_concurrent_sequences(capacity, settings.context_length_tokens,
                                                          settings.block_size),
        usd_per_device_hour=usd_per_device_hour,
        tokens_per_second=settings.tokens_per_second,
    )


def device_hour_price(hardware: str, book: PriceBook | None, at: float) -> float:
    """USD per device-hour of the class: the price book's price in force at `at` (unix seconds),
    else HARDWARE's."""
    price = book.hardware_price(hardware, at) if book is not None else None
    return price.usd_per_device_hour if price is not None else HARDWARE[hardware].usd_per_device_hour


COMPARE_AXES: dict[str, str] = {
    "hardware": "hardware",
    "weights": "weights",
    "kv": "kv",
    "tp": "tensor_parallel_size",
}
"""`--compare` axis -> the Deployment.from_names argument it varies."""


def parse_compare(items: list[str]) -> dict[str, list[str]]:
    """["weights=fp16,int8", "tp=4"] -> {"weights": ["fp16", "int8"], "tp": ["4"]}."""
    axes: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in COMPARE_AXES:
            raise ValueError(f"--compare takes AXIS=VALUE[,VALUE...] with AXIS one of: "
                             f"{', '.join(COMPARE_AXES)}; got {item!r}")
        if name in axes:
            raise ValueError(f"--compare names {name} twice")
        listed = [value.strip() for value in values.split(",") if value.strip()]
        if not listed:
            raise ValueError(f"--compare {name}= lists no values")
        axes[name] = listed
    return axes


def deployments(base: dict[str, Any], axes: dict[str, list[str]]) -> list[Deployment]:
    """Every combination of the axes' values (the cartesian product, in the order given), the
    other Deployment.from_names arguments taken from `base`."""
    names = list(axes)
    combos = itertools.product(*(axes[name] for name in names))
    return [Deployment.from_names(**(base | {COMPARE_AXES[n]: v for n, v in zip(names, combo)}))
            for combo in combos]


def _is_auto(name: str | None) -> bool:
    return name is None or name.strip().lower() == "auto"


def _whole_number(value: int | str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
