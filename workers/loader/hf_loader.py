"""Loading a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) into a
`Checkpoint`. Weights keep the names and dtype they were saved with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import load_file

from workers.loader.checkpoint import Checkpoint, checkpoint_name
from workers.models.config import LlamaConfig
from workers.models.hf_config import read_hf_config, read_json
from workers.tokenizer import Tokenizer

_SINGLE_FILE = "model.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"
_EMBEDDING = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


def load_hf_folder(folder: Path) -> Checkpoint:
    """A Hugging Face model folder as a `Checkpoint`."""
    config = read_hf_config(folder)
    tensors = _without_tied_head(_load_safetensors(folder), config)
    return Checkpoint(config, tensors, hf_tokenizer(folder), checkpoint_name(folder), folder)


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / _SHARD_INDEX
    if index.is_file():
        weight_map: dict[str, str] = read_json(index)["weight_map"]
        tensors = _merge_shards([folder / shard for shard in sorted(set(weight_map.values()))])
        if missing := sorted(set(weight_map) - set(tensors)):
            raise ValueError(f"{index} lists tensors no shard holds, e.g. {missing[:3]}")
        return tensors
    if (folder / _SINGLE_FILE).is_file():
        return load_file(folder / _SINGLE_FILE)
    raise FileNotFoundError(f"{folder} has neither {_SINGLE_FILE} nor {_SHARD_INDEX}")


def _merge_shards(shards: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} named in {_SHARD_INDEX} is missing")
        part = load_file(shard)
        if repeated := sorted(tensors.keys() & part.keys()):
            raise ValueError(f"tensors {repeated[:3]} appear in more than one shard")
        tensors.update(part)
    return tensors


def _without_tied_head(tensors: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    if _EMBEDDING not in tensors:
        raise ValueError(f"the checkpoint has no {_EMBEDDING}")
    head = tensors.get(_LM_HEAD)
    if head is None and not config.tie_word_embeddings:
        raise ValueError(f"the checkpoint has no {_LM_HEAD} and does not tie it to the embedding")
    if config.tie_word_embeddings and head is not None and torch.equal(head, tensors[_EMBEDDING]):
        # Some exporters save the tied matrix twice; keep the one the model reads.
        return {name: tensor for name, tensor in tensors.items() if name != _LM_HEAD}
    return tensors


def hf_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder: tokenizer.json plus the conventions in
    tokenizer_config.json, generation_config.json and chat_template.jinja."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (slow tokenizers are not supported)")
    backend = tokenizers.Tokenizer.from_file(str(path))
    settings = _read_json_if_present(folder / "tokenizer_config.json")
    generation = _read_json_if_present(folder / "generation_config.json")
    stop_ids = _as_list(generation.get("eos_token_id"))
    bos_token_id = _first_given(_token_id(backend, settings.get("bos_token")), generation.get("bos_token_id"))
    eos_token_id = _first_given(_token_id(backend, settings.get("eos_token")), *stop_ids)
    add_bos_token = settings.get("add_bos_token")
    if add_bos_token is None:
        # No explicit flag: the tokenizer.json post-processor is what transformers would follow.
        add_bos_token = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]
    return Tokenizer(backend, bos_token_id=bos_token_id, eos_token_id=eos_token_id, add_bos_token=add_bos_token,
                     chat_template=_chat_template(folder, settings), extra_eos_token_ids=stop_ids)


def _token_id(backend: tokenizers.Tokenizer, token: str | dict[str, Any] | None) -> int | None:
    # tokenizer_config.json spells a token as text, or as a serialized AddedToken.
    if token is None:
        return None
    content = token["content"] if isinstance(token, dict) else token
    token_id = backend.token_to_id(content)
    if token_id is None:
        raise ValueError(f"tokenizer_config.json names token {content!r}, which is not in the vocabulary")
    return token_id


def _first_given(*token_ids: int | None) -> int | None:
    return next((token_id for token_id in token_ids if token_id is not None), None)


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        # Several named templates (e.g. "default", "tool_use"): chat uses the default one.
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


def _read_json_if_present(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}
