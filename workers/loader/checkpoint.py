"""What every loader returns: a model's shape, its weights under Hugging Face names, its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.models.config import LlamaConfig
from workers.tokenizer import Tokenizer


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model, independent of the file format it came from."""

    config: LlamaConfig
    tensors: dict[str, torch.Tensor] = field(repr=False)
    """Weights keyed by Hugging Face parameter name, e.g. "model.layers.0.self_attn.q_proj.weight".
    A tied model has no "lm_head.weight"."""
    tokenizer: Tokenizer = field(repr=False)
    name: str
    """The model name served by default, e.g. "smollm2-135m-instruct"."""
    source: Path
    """The file or folder it was loaded from."""


def checkpoint_name(path: Path) -> str:
    """The default served name: the file or folder name before its first ".", lower-cased."""
    name = path.name.split(".", 1)[0].lower()
    if not name:
        raise ValueError(f"cannot name a model after {path}: its name starts with a dot")
    return name
