"""A Hugging Face model's shape from its config.json, read without torch (the loader,
workers/loader/hf_loader.py, reads the weights; `fareway plan` reads only this)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.models.config import LlamaConfig, RopeScaling


@dataclass(frozen=True)
class HfArchitecture:
    """What sets one transformers architecture apart from plain Llama."""

    has_qkv_bias: bool = False
    """Q/K/V carry a bias whatever config.json says (Qwen2's config has no key for it)."""


ARCHITECTURES: dict[str, HfArchitecture] = {
    "LlamaForCausalLM": HfArchitecture(),
    "MistralForCausalLM": HfArchitecture(),
    "Qwen2ForCausalLM": HfArchitecture(has_qkv_bias=True),
}


def read_hf_config(folder: Path) -> LlamaConfig:
    """The shape of the Hugging Face model in `folder`, from its config.json."""
    return hf_config(read_json(folder / "config.json"))


def hf_config(raw: dict[str, Any]) -> LlamaConfig:
    """The model's shape from a transformers config.json."""
    architecture = _architecture(raw)
    _check_supported(raw)
    hidden_size = _required(raw, "hidden_size")
    num_heads = _required(raw, "num_attention_heads")
    rope = _rope_parameters(raw)
    return LlamaConfig(
        vocab_size=_required(raw, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_required(raw, "intermediate_size"),
        num_layers=_required(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or hidden_size // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", 10_000.0),
        rope_scaling=_rope_scaling(rope),
        max_position_embeddings=_context_length(raw),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=architecture.has_qkv_bias or raw.get("attention_bias", False),
    )


def _architecture(raw: dict[str, Any]) -> HfArchitecture:
    names = raw.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported architectures {names} in config.json; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[names[0]]


def _check_supported(raw: dict[str, Any]) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported")


def _required(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ValueError(f"config.json has no {key}")
    return raw[key]


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 one rope_parameters dict.
    return {"rope_theta": raw.get("rope_theta", 10_000.0), **(raw.get("rope_scaling") or {}),
            **(raw.get("rope_parameters") or {})}


def _llama3_scaling(rope: dict[str, Any]) -> RopeScaling:
    return RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                       high_freq_factor=rope["high_freq_factor"],
                       original_max_position_embeddings=rope["original_max_position_embeddings"])


ROPE_TYPES: dict[str, Callable[[dict[str, Any]], RopeScaling | None]] = {
    "default": lambda rope: None,
    "llama3": _llama3_scaling,
}
"""Rope scaling by config.json rope_type."""


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {sorted(ROPE_TYPES)}")
    return ROPE_TYPES[rope_type](rope)


def _context_length(raw: dict[str, Any]) -> int:
    context_length = _required(raw, "max_position_embeddings")
    window = raw.get("sliding_window")
    if window and raw.get("use_sliding_window", True) and window < context_length:
        # Within one window, sliding-window attention is full attention: serve only that much.
        return window
    return context_length


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object; ValueError naming the file if it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
