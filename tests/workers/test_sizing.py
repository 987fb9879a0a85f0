"""Bytes of weights and KV cache per rank, checked against sums done by hand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.planner import PRESETS
from workers.models.config import LlamaConfig
from workers.sizing import (
    KV_DTYPES,
    WEIGHT_DTYPES,
    kv_bytes_per_token,
    kv_bytes_per_token_total,
    kv_capacity_tokens,
    max_concurrent_sequences,
    normalize_dtype,
    rank_shard,
    weight_bytes_per_rank,
)

LLAMA_8B = PRESETS["llama-3.1-8b"]
LLAMA_70B = PRESETS["llama-3.1-70b"]
SMOLLM2 = PRESETS["smollm2-135m"]


def test_the_dtype_lists_are_the_contract() -> None:
    assert WEIGHT_DTYPES == ("fp32", "fp16", "bf16", "int8")
    assert KV_DTYPES == ("fp32", "fp16", "bf16", "fp8_e4m3", "int8")


@pytest.mark.parametrize(("name", "dtype"), [("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16"),
                                             ("BF16", "bf16"), ("fp8", "fp8_e4m3"), ("int8", "int8")])
def test_normalize_dtype_accepts_aliases(name: str, dtype: str) -> None:
    assert normalize_dtype(name) == dtype


def test_normalize_dtype_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="fp32, fp16, bf16, int8"):
        normalize_dtype("fp8_e4m3", WEIGHT_DTYPES)


def test_llama_8b_kv_bytes_per_token_in_16_bits() -> None:
    # K and V x 32 layers x 8 KV heads x 128 dims x 2 bytes.
    assert kv_bytes_per_token(LLAMA_8B, "fp16") == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(LLAMA_8B, "bfloat16") == 131072
    assert kv_bytes_per_token(LLAMA_8B, "fp32") == 2 * 131072


def test_8_bit_kv_halves_the_bytes_int8_plus_its_scales() -> None:
    # fp8 has one scale per layer: exactly half.
    assert kv_bytes_per_token(LLAMA_8B, "fp8_e4m3") == 131072 // 2
    # int8 adds an fp32 scale per token, layer and KV head, for K and for V: 2 x 32 x 8 x 4 bytes.
    assert kv_bytes_per_token(LLAMA_8B, "int8") == 65536 + 2 * 32 * 8 * 4 == 67584


def test_kv_heads_split_across_ranks() -> None:
    # SmolLM2: 3 KV heads of 64 dims, 30 layers; at TP 3 one head per rank, nothing replicated.
    assert kv_bytes_per_token(SMOLLM2, "fp16") == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(SMOLLM2, "fp16", 3) == 2 * 30 * 1 * 64 * 2 == 7680
    assert kv_bytes_per_token_total(SMOLLM2, "fp16", 3) == 23040


def test_more_ranks_than_kv_heads_replicate_them() -> None:
    # 70B has 8 KV heads: at TP 16 each rank holds one, so the replica stores each twice.
    assert rank_shard(LLAMA_70B, 16).num_kv_heads == 1
    assert kv_bytes_per_token(LLAMA_70B, "fp16", 16) == kv_bytes_per_token(LLAMA_70B, "fp16", 8) == 2 * 80 * 128 * 2
    assert kv_bytes_per_token_total(LLAMA_70B, "fp16", 16) == 2 * kv_bytes_per_token_total(LLAMA_70B, "fp16", 1)
    # Q heads 64 / 16 = 4 per rank, and the K/V rows of its one head: (4 + 2) x 128 qkv rows.
    tp16 = weight_bytes_per_rank(LLAMA_70B, "bf16", 16)
    layer = (6 * 128 * 8192 + 8192 * 4 * 128 + 2 * 1792 * 8192 + 8192 * 1792 + 2 * 8192) * 2
    assert tp16 == 80 * layer + 8192 * 2 + 2 * 128256 * 8192 * 2


@pytest.mark.parametrize(("config", "tp"), [(LLAMA_70B, 3), (SMOLLM2, 2), (SMOLLM2, 9)])
def test_a_model_that_does_not_split_is_refused(config: LlamaConfig, tp: int) -> None:
    with pytest.raises(ValueError, match="tensor parallel size"):
        weight_bytes_per_rank(config, "bf16", tp)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_fp32_weights_are_4_bytes_per_parameter(name: str) -> None:
    config = PRESETS[name]
    assert weight_bytes_per_rank(config, "fp32") == 4 * config.num_parameters
    assert weight_bytes_per_rank(config, "bf16") == 2 * config.num_parameters


def test_llama_70b_weights_per_gpu_at_tp_8() -> None:
    # Per rank: 8 Q heads, 1 KV head, 3584 MLP columns; embedding and head replicated.
    qkv = (8 + 2) * 128 * 8192
    o = 8192 * 8 * 128
    gate_up = 2 * 3584 * 8192
    down = 8192 * 3584
    norms = 2 * 8192
    embedding_and_head = 2 * 128256 * 8192
    elements = 80 * (qkv + o + gate_up + down + norms) + 8192 + embedding_and_head
    assert elements == 10_659_045_376
    assert weight_bytes_per_rank(LLAMA_70B, "bf16", 8) == 2 * elements == 21_318_090_752
    # int8: a byte per weight and an fp32 scale per output channel; norms in fp32.
    channels = (10 * 128 + 8192 + 2 * 3584 + 8192)
    int8 = (80 * ((qkv + o + gate_up + down) + 4 * channels + 4 * norms) + 4 * 8192
            + 2 * (128256 * 8192 + 4 * 128256))
    assert weight_bytes_per_rank(LLAMA_70B, "int8", 8) == int8 == 10_671_974_400


def test_smollm2_weights_at_tp_3_against_tp_1() -> None:
    # Per rank: 3 Q heads, 1 KV head, 512 MLP columns; the tied embedding, norms replicated.
    layer = (3 + 2) * 64 * 576 + 576 * 3 * 64 + 2 * 512 * 576 + 576 * 512
    tp3 = 4 * (30 * (layer + 2 * 576) + 576 + 49152 * 576)
    assert weight_bytes_per_rank(SMOLLM2, "fp32", 3) == tp3 == 254_944_512
    # Only the decoder linears split: tp1 - tp3 is 2/3 of them.
    tp1_linears = 30 * 3 * layer
    assert weight_bytes_per_rank(SMOLLM2, "fp32", 1) - tp3 == 4 * tp1_linears * 2 // 3


def test_int8_holds_a_tied_embedding_twice() -> None:
    # The embedding (per-row scales) and the head (per-output-channel scales) are two int8 copies.
    matrix = 49152 * 576 + 4 * 49152
    linears = 30 * (576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576)
    scales = 30 * 4 * (960 + 576 + 3072 + 576)
    norms = 4 * (30 * 2 * 576 + 576)
    assert weight_bytes_per_rank(SMOLLM2, "int8") == linears + scales + norms + 2 * matrix


def test_kv_capacity_counts_whole_blocks() -> None:
    # 131072 bytes per token x 16 tokens per block: 1 GiB holds 512 blocks; 10 bytes short, 511.
    assert kv_capacity_tokens(2**30, LLAMA_8B, "fp16") == 512 * 16
    assert kv_capacity_tokens(2**30 - 10, LLAMA_8B, "fp16") == 511 * 16
    assert kv_capacity_tokens(-1, LLAMA_8B, "fp16") == 0


@pytest.mark.parametrize(("capacity", "length", "sequences"), [
    (160, 16, 10), (160, 17, 5), (160, 1, 10), (175, 32, 5), (15, 1, 0), (459_088, 4096, 112)])
def test_max_concurrent_sequences_take_whole_blocks(capacity: int, length: int, sequences: int) -> None:
    assert max_concurrent_sequences(capacity, length) == sequences


def test_sizing_imports_no_torch() -> None:
    code = ("import sys, workers.sizing, workers.models.config_files, cli.planner, cli.plan; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
