"""How many bytes a model's weights and KV cache take on each tensor-parallel rank of our worker,
and so how many tokens and sequences a KV pool holds. Plain Python: `fareway plan` sizes
deployments with it before any device exists, and the worker sizes its KV pool the same way.

The layout counted is the worker's:

- Decoder linears are sharded Megatron-style: qkv and gate_up by output rows (column parallel),
  o and down by input columns (row parallel). When there are more ranks than KV heads, each rank
  holds one KV head, its K/V projection rows replicated.
- The embedding and the output head are replicated on every rank.
- Norms and biases are replicated, in the weights' dtype for floats and in fp32 for int8.
- int8 weights are 1 byte each plus an fp32 scale per output channel (per row of the embedding).
  A tied head shares the embedding's storage in floats; in int8 it is its own quantized copy.
- The KV cache holds K and V per layer and per KV head on the rank; int8 adds an fp32 scale per
  token and KV head for each of K and V, fp8 (e4m3) a channel offset and a scale per
  KV head and layer (no bytes per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.models.config import LlamaConfig

FP32_SCALE_BYTES = 4


@dataclass(frozen=True)
class WeightStorage:
    """How one weight dtype stores a model's parameters."""

    matrix_element_bytes: int
    """Bytes per element of a linear or embedding matrix."""
    scale_bytes_per_output_channel: int
    """Bytes of quantization scale per output channel of a matrix (per row of the embedding)."""
    vector_element_bytes: int
    """Bytes per element of norms and biases."""
    head_shares_embedding: bool
    """A tied output head reuses the embedding's storage (False: it is quantized on its own)."""

    def __post_init__(self) -> None:
        if self.matrix_element_bytes <= 0 or self.vector_element_bytes <= 0:
            raise ValueError("element sizes must be positive")
        if self.scale_bytes_per_output_channel < 0:
            raise ValueError("scale bytes cannot be negative")


@dataclass(frozen=True)
class KvStorage:
    """How one KV cache dtype stores a token's keys and values."""

    element_bytes: int
    """Bytes per element of K or V."""
    scale_bytes_per_token_head: int
    """Bytes of scale per token and KV head, for K and again for V (per-token quantization)."""

    def __post_init__(self) -> None:
        if self.element_bytes <= 0 or self.scale_bytes_per_token_head < 0:
            raise ValueError("element bytes must be positive and scale bytes not negative")


WEIGHT_STORAGE: dict[str, WeightStorage] = {
    "fp32": WeightStorage(4, 0, 4, head_shares_embedding=True),
    "fp16": WeightStorage(2, 0, 2, head_shares_embedding=True),
    "bf16": WeightStorage(2, 0, 2, head_shares_embedding=True),
    "int8": WeightStorage(1, FP32_SCALE_BYTES, 4, head_shares_embedding=False),
}
KV_STORAGE: dict[str, KvStorage] = {
    "fp32": KvStorage(4, 0),
    "fp16": KvStorage(2, 0),
    "bf16": KvStorage(2, 0),
    # One scale per layer: nothing per token.
    "fp8_e4m3": KvStorage(1, 0),
    "int8": KvStorage(1, FP32_SCALE_BYTES),
}
WEIGHT_DTYPES = tuple(WEIGHT_STORAGE)
"""("fp32", "fp16", "bf16", "int8")"""
KV_DTYPES = tuple(KV_STORAGE)
"""("fp32", "fp16", "bf16", "fp8_e4m3", "int8")"""

DTYPE_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "fp8": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
}
"""Other spellings (torch's among them) of the dtypes above."""


def normalize_dtype(name: str, choices: tuple[str, ...] = KV_DTYPES) -> str:
    """"bfloat16" -> "bf16"; ValueError listing `choices` if the name is none of them."""
    key = name.strip().lower().replace("-", "_")
    dtype = DTYPE_ALIASES.get(key, key)
    if dtype not in choices:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(choices)}")
    return dtype


@dataclass(frozen=True)
class RankShard:
    """What one tensor-parallel rank holds of each layer."""

    num_heads: int
    num_kv_heads: int
    """1 when ranks outnumber KV heads: each rank holds a replica of one."""
    intermediate_size: int


def rank_shard(config: LlamaConfig, tensor_parallel_size: int = 1) -> RankShard:
    """The heads and MLP width on each rank; ValueError if the model does not split that way."""
    tp = tensor_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {tp}")
    for name, size in (("num_heads", config.num_heads), ("intermediate_size", config.intermediate_size)):
        if size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the model's {name} ({size})")
    if config.num_kv_heads % tp == 0:
        num_kv_heads = config.num_kv_heads // tp
    elif tp % config.num_kv_heads == 0:
        num_kv_heads = 1
    else:
        raise ValueError(f"tensor parallel size {tp} neither divides nor is a multiple of the model's "
                         f"{config.num_kv_heads} KV heads")
    return RankShard(config.num_heads // tp, num_kv_heads, config.intermediate_size // tp)


def kv_bytes_per_token(config: LlamaConfig, kv_dtype: str, tensor_parallel_size: int = 1) -> int:
    """Bytes one rank's KV cache stores per token: K and V of every layer for its KV heads."""
    storage = KV_STORAGE[normalize_dtype(kv_dtype, KV_DTYPES)]
    num_kv_heads = rank_shard(config, tensor_parallel_size).num_kv_heads
    bytes_per_head = config.head_dim * storage.element_bytes + storage.scale_bytes_per_token_head
    return 2 * config.num_layers * num_kv_heads * bytes_per_head


def kv_bytes_per_token_total(config: LlamaConfig, kv_dtype: str, tensor_parallel_size: int = 1) -> int:
    """Bytes a whole replica (all its ranks, replicated KV heads included) stores per token."""
    return kv_bytes_per_token(config, kv_dtype, tensor_parallel_size) * tensor_parallel_size


def weight_bytes_per_rank(config: LlamaConfig, weight_dtype: str, tensor_parallel_size: int = 1) -> int:
    """Bytes of weights on each rank: its shard of the decoder, plus the replicated embedding,
    head and norms."""
    storage = WEIGHT_STORAGE[normalize_dtype(weight_dtype, WEIGHT_DTYPES)]
    shard = rank_shard(config, tensor_parallel_size)
    per_layer = (sum(_matrix_bytes(out, inp, storage) for out, inp in _layer_linears(config, shard))
                 + _layer_vector_elements(config, shard) * storage.vector_element_bytes)
    final_norm = config.hidden_size * storage.vector_element_bytes
    return config.num_layers * per_layer + final_norm + _embedding_and_head_bytes(config, storage)


def _layer_linears(config: LlamaConfig, shard: RankShard) -> list[tuple[int, int]]:
    """(output features, input features) of each linear of a decoder layer on one rank."""
    hidden, head_dim = config.hidden_size, config.head_dim
    return [
        ((shard.num_heads + 2 * shard.num_kv_heads) * head_dim, hidden),  # qkv: column parallel
        (hidden, shard.num_heads * head_dim),                              # o: row parallel
        (2 * shard.intermediate_size, hidden),                             # gate_up: column parallel
        (hidden, shard.intermediate_size),                                 # down: row parallel
    ]


def _layer_vector_elements(config: LlamaConfig, shard: RankShard) -> int:
    """Elements of a layer's two norms and, where the model has them, its q/k/v biases."""
    qkv_bias = (shard.num_heads + 2 * shard.num_kv_heads) * config.head_dim if config.attention_bias else 0
    return 2 * config.hidden_size + qkv_bias


def _matrix_bytes(out_features: int, in_features: int, storage: WeightStorage) -> int:
    return out_features * (in_features * storage.matrix_element_bytes + storage.scale_bytes_per_output_channel)


def _embedding_and_head_bytes(config: LlamaConfig, storage: WeightStorage) -> int:
    """The [vocab, hidden] embedding and output head; held once when tied, unless quantized apart."""
    matrix = _matrix_bytes(config.vocab_size, config.hidden_size, storage)
    is_shared = config.tie_word_embeddings and storage.head_shares_embedding
    return matrix if is_shared else 2 * matrix


def num_kv_blocks(kv_memory_bytes_per_rank: int, bytes_per_token: int, block_size: int = 16) -> int:
    """Whole blocks of `block_size` tokens that a rank's KV memory holds (0 if none)."""
    if bytes_per_token <= 0 or block_size < 1:
        raise ValueError(f"bytes_per_token and block_size must be positive, got {bytes_per_token}, {block_size}")
    return max(kv_memory_bytes_per_rank, 0) // (bytes_per_token * block_size)


def kv_capacity_tokens(kv_memory_bytes_per_rank: int, config: LlamaConfig, kv_dtype: str,
                       tensor_parallel_size: int = 1, block_size: int = 16) -> int:
    """Tokens the replica's KV pool holds when each rank gives it `kv_memory_bytes_per_rank`:
    whole blocks only, as the block manager allocates them."""
    bytes_per_token = kv_bytes_per_token(config, kv_dtype, tensor_parallel_size)
    return num_kv_blocks(kv_memory_bytes_per_rank, bytes_per_token, block_size) * block_size


def max_concurrent_sequences(capacity_tokens: int, sequence_length: int, block_size: int = 16) -> int:
    """Sequences of `sequence_length` tokens (prompt and completion) a pool of `capacity_tokens`
    holds at once, each taking whole blocks (as ModelRunner.max_sequences_at counts them)."""
    if sequence_length < 1 or block_size < 1:
        raise ValueError(f"sequence_length and block_size must be positive, got {sequence_length}, {block_size}")
    return (max(capacity_tokens, 0) // block_size) // -(-sequence_length // block_size)
