"""A GGUF file's header, and the model shape its metadata describes, read without torch.

The header is parsed here with `struct` rather than `gguf.GGUFReader`: the reader wraps every
vocabulary string and token type in its own numpy view, which costs about 7 s for SmolLM2's
49k-token vocabulary against 0.3 s here. Key names and tensor types come from `gguf`.
The loader (workers/loader/gguf_loader.py) reads the tensors; `fareway plan` reads only this.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys

from workers.models.config import LlamaConfig

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_REQUIRED = object()

_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("?"),
}


@dataclass(frozen=True)
class GgufTensorInfo:
    """Where one tensor lives in the file."""

    name: str
    shape: tuple[int, ...]
    """In torch order: [out, in] for a matrix."""
    ggml_type: GGMLQuantizationType
    offset: int
    """Bytes from the start of the file."""


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata and tensor table; the tensor data stays on disk."""

    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]

    @property
    def architecture(self) -> str:
        """llama.cpp's architecture name, e.g. "llama"; the prefix of the model's metadata keys."""
        return self.metadata["general.architecture"]


@dataclass(frozen=True)
class GgufArchitecture:
    """What loading one llama.cpp architecture as a Llama-family model takes."""

    permutes_qk: bool
    """llama.cpp's converter reordered Q/K rows for its interleaved rotary kernel."""


ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture(permutes_qk=True),
    "qwen2": GgufArchitecture(permutes_qk=False),
}


def read_header(buffer: mmap.mmap, path: Path) -> GgufHeader:
    """The metadata and tensor table at the start of a GGUF file."""
    if buffer[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with {_MAGIC!r})")
    try:
        return _parse_header(_HeaderReader(buffer, offset=4), path)
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is truncated or corrupt: {error}") from error


def _parse_header(reader: _HeaderReader, path: Path) -> GgufHeader:
    version = reader.scalar(GGUFValueType.UINT32)
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; supported versions: {_SUPPORTED_VERSIONS}")
    num_tensors = reader.scalar(GGUFValueType.UINT64)
    num_keys = reader.scalar(GGUFValueType.UINT64)
    metadata = dict(reader.key_value() for _ in range(num_keys))
    if "general.architecture" not in metadata:
        raise ValueError(f"{path} has no general.architecture in its metadata")
    entries = [reader.tensor_entry() for _ in range(num_tensors)]
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = (reader.offset + alignment - 1) // alignment * alignment
    tensors = {name: GgufTensorInfo(name, shape, ggml_type, data_start + offset)
               for name, shape, ggml_type, offset in entries}
    return GgufHeader(metadata, tensors)



def read_gguf_header(path: Path) -> GgufHeader:
    """The header of the GGUF file at `path`; no tensor data is read."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return read_header(buffer, path)

class _HeaderReader:
    """Reads GGUF's little-endian values one after another."""

    def __init__(self, buffer: mmap.mmap, offset: int) -> None:
        self._buffer = buffer
        self.offset = offset

    def scalar(self, value_type: GGUFValueType) -> Any:
        dtype = _SCALAR_DTYPES[value_type]
        (value,) = struct.unpack_from(f"<{dtype.char}", self._buffer, self.offset)
        self.offset += dtype.itemsize
        if value_type == GGUFValueType.FLOAT32:
            # Converters write config floats (1e-5) as float32; keep the decimal they were given.
            return float(str(np.float32(value)))
        return value

    def string(self) -> str:
        length = self.scalar(GGUFValueType.UINT64)
        start, self.offset = self.offset, self.offset + length
        return self._buffer[start:self.offset].decode("utf-8")

    def value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        if value_type not in _SCALAR_DTYPES:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.scalar(value_type)

    def array(self) -> list[Any]:
        item_type = GGUFValueType(self.scalar(GGUFValueType.UINT32))
        count = self.scalar(GGUFValueType.UINT64)
        if item_type in _SCALAR_DTYPES:
            # In one go: a vocabulary's token types are 10^5 numbers.
            dtype = _SCALAR_DTYPES[item_type]
            values = np.frombuffer(self._buffer, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return values
        return [self.value(item_type) for _ in range(count)]

    def key_value(self) -> tuple[str, Any]:
        key = self.string()
        return key, self.value(GGUFValueType(self.scalar(GGUFValueType.UINT32)))

    def tensor_entry(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self.string()
        num_dims = self.scalar(GGUFValueType.UINT32)
        dims = [self.scalar(GGUFValueType.UINT64) for _ in range(num_dims)]
        ggml_type = GGMLQuantizationType(self.scalar(GGUFValueType.UINT32))
        offset = self.scalar(GGUFValueType.UINT64)
        # ggml lists the fastest-moving dimension first, torch last.
        return name, tuple(reversed(dims)), ggml_type, offset


def gguf_metadata_config(header: GgufHeader) -> LlamaConfig:
    """The model's shape from its llama.cpp metadata keys.

    Llama 3's rope scaling is stored as a tensor, not a key: it is None here, and the loader
    (`gguf_loader.gguf_config`) fills it in from that tensor.
    """
    _check_supported(header)
    architecture, metadata, tensors = header.architecture, header.metadata, header.tensors

    def value(template: str, default: Any = _REQUIRED) -> Any:
        key = template.format(arch=architecture)
        if key not in metadata and default is _REQUIRED:
            raise ValueError(f"the GGUF file has no {key} in its metadata")
        return metadata.get(key, default)

    hidden_size = value(Keys.LLM.EMBEDDING_LENGTH)
    num_heads = value(Keys.Attention.HEAD_COUNT)
    head_dim = value(Keys.Attention.KEY_LENGTH, hidden_size // num_heads)
    rope_theta = value(Keys.Rope.FREQ_BASE, 10_000.0)
    _check_head_dims(value(Keys.Attention.VALUE_LENGTH, head_dim), value(Keys.Rope.DIMENSION_COUNT, head_dim),
                     head_dim)
    scaling_type = value(Keys.Rope.SCALING_TYPE, "none")
    if scaling_type != "none":
        raise ValueError(f"rope scaling type {scaling_type!r} is not supported (only Llama 3's)")
    return LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden_size,
        intermediate_size=value(Keys.LLM.FEED_FORWARD_LENGTH),
        num_layers=value(Keys.LLM.BLOCK_COUNT),
        num_heads=num_heads,
        num_kv_heads=value(Keys.Attention.HEAD_COUNT_KV, num_heads),
        head_dim=head_dim,
        rms_norm_eps=value(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5),
        rope_theta=rope_theta,
        max_position_embeddings=value(Keys.LLM.CONTEXT_LENGTH),
        # llama.cpp writes an output matrix only when it is not the embedding matrix.
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
    )


def _check_supported(header: GgufHeader) -> None:
    if header.architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {header.architecture!r}; supported: {sorted(ARCHITECTURES)}")
    if "token_embd.weight" not in header.tensors:
        raise ValueError("the GGUF file has no token_embd.weight tensor")


def _check_head_dims(value_dim: int, rotary_dim: int, head_dim: int) -> None:
    if value_dim != head_dim:
        raise ValueError(f"value heads of {value_dim} dims differ from key heads of {head_dim}; not supported")
    if rotary_dim != head_dim:
        raise ValueError(f"rotary embedding over {rotary_dim} of {head_dim} head dims (partial rotary) is not supported")
