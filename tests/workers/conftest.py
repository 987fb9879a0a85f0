"""Fixtures shared by the worker tests: transformers' loading of the SmolLM2 GGUF as the
reference (about 45 s, so once per session). The GGUF and our loading of it are in
tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch


@dataclass(frozen=True)
class HfReference:
    """transformers' reading of the SmolLM2 GGUF."""

    model: Any
    """A `LlamaForCausalLM` in float32."""
    tokenizer: Any
    """The `PreTrainedTokenizerFast` transformers builds from the GGUF metadata."""


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
