"""A model's shape from its file or folder alone: no tensor is read and torch is not imported,
so `fareway plan` can size a 70B model in a fraction of a second."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workers.models.config import LlamaConfig
from workers.models.gguf_header import gguf_metadata_config, read_gguf_header
from workers.models.hf_config import read_hf_config

CONFIG_READERS: dict[str, Callable[[Path], LlamaConfig]] = {
    "gguf": lambda path: gguf_metadata_config(read_gguf_header(path)),
    "hf": read_hf_config,
}
"""Config readers by source kind (see source_kind). A GGUF file's Llama 3 rope scaling is
stored as a tensor, so it reads as None here; nothing sized from the config depends on it."""


def source_kind(path: Path) -> str:
    """"gguf" for a .gguf file, "hf" for a Hugging Face model folder with a config.json."""
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder with a config.json")


def read_model_config(path: str | Path) -> LlamaConfig:
    """The shape of the model at `path` (a .gguf file or a Hugging Face folder), tensors unread."""
    source = Path(path).expanduser().resolve()
    return CONFIG_READERS[source_kind(source)](source)
