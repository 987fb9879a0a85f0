"""Fixtures shared by the worker tests: the default SmolLM2 GGUF, our loading of it, and
transformers' loading of the same file as the reference (about 45 s, so once per session)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.loader import Checkpoint, default_model_path, load_checkpoint


@dataclass(frozen=True)
class HfReference:
    """transformers' reading of the SmolLM2 GGUF."""

    model: Any
    """A `LlamaForCausalLM` in float32."""
    tokenizer: Any
    """The `PreTrainedTokenizerFast` transformers builds from the GGUF metadata."""


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Checkpoint:
    return load_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_reference(smollm2_gguf: Path) -> Iterator[HfReference]:
    with pytest.MonkeyPatch.context() as patch:
        # Everything is on disk; a test must never reach for the Hub.
        patch.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, file_name = str(smollm2_gguf.parent), smollm2_gguf.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        yield HfReference(model.eval(), tokenizer)
