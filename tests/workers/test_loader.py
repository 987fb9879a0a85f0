"""Checkpoints load to the same config, weights and tokenizer whatever file they come from."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import save_file
from tokenizers import pre_tokenizers, processors

from workers.loader import Checkpoint, default_model_path, load_checkpoint
from workers.models.config import LlamaConfig, RopeScaling
from workers.tokenizer import byte_level_bpe

SPECIAL_TOKENS = ["<s>", "</s>", "<|eot|>"]
TOKENS = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", *SPECIAL_TOKENS]
BOS_ID, EOS_ID, EOT_ID = (TOKENS.index(token) for token in SPECIAL_TOKENS)
MERGES = ["Ġ t"]
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"

TINY = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10_000.0,
                   max_position_embeddings=256)
LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)


def random_tensors(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with Hugging Face names and shapes for `config`."""
    hidden, q_rows, kv_rows = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden),
                                          "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (config.intermediate_size, hidden),
            f"{prefix}.mlp.up_proj.weight": (config.intermediate_size, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, config.intermediate_size),
        }
        if config.attention_bias:
            shapes |= {f"{prefix}.self_attn.q_proj.bias": (q_rows,), f"{prefix}.self_attn.k_proj.bias": (kv_rows,),
                       f"{prefix}.self_attn.v_proj.bias": (kv_rows,)}
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


# --- GGUF files written with gguf's own writer, the way llama.cpp's converter writes them -------------

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's `LlamaModel.permute`, as llama.cpp applies it to Q and K."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_rope_factors(config: LlamaConfig, scaling: RopeScaling) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for a Llama 3 rope_scaling."""
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path: Path, config: LlamaConfig, tensors: dict[str, torch.Tensor], *, architecture: str = "llama",
               quantized: dict[str, GGMLQuantizationType] | None = None,
               extra_metadata: dict[str, Any] | None = None, rope_factors: np.ndarray | None = None) -> None:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL
                            for token in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_eot_token_id(EOT_ID)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value)
    for name, tensor in tensors.items():
        if architecture == "llama" and ".q_proj." in name:
            tensor = llama_cpp_permute(tensor, config.num_heads, config.num_heads)
        elif architecture == "llama" and ".k_proj." in name:
            tensor = llama_cpp_permute(tensor, config.num_heads, config.num_kv_heads)
        data = tensor.numpy()
        ggml_type = (quantized or {}).get(name)
        if ggml_type is None:
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_gguf_round_trip_undoes_the_rotary_permutation(tmp_path: Path) -> None:
    tensors = random_tensors(TINY)
    write_gguf(tmp_path / "Tiny-Llama.F32.gguf", TINY, tensors)
    checkpoint = load_checkpoint(tmp_path / "Tiny-Llama.F32.gguf")
    assert checkpoint.config == TINY
    assert_same_tensors(checkpoint.tensors, tensors)
    assert (checkpoint.name, checkpoint.source) == ("tiny-llama", tmp_path / "Tiny-Llama.F32.gguf")


def test_gguf_without_output_matrix_ties_embeddings(tmp_path: Path) -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    tensors = random_tensors(tied)
    write_gguf(tmp_path / "tied.gguf", tied, tensors)
    checkpoint = load_checkpoint(tmp_path / "tied.gguf")
    assert checkpoint.config.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.tensors
    assert_same_tensors(checkpoint.tensors, tensors)


def test_gguf_qwen2_keeps_row_order_and_biases(tmp_path: Path) -> None:
    qwen2 = dataclasses.replace(TINY, attention_bias=True)
    tensors = random_tensors(qwen2)
    write_gguf(tmp_path / "qwen.gguf", qwen2, tensors, architecture="qwen2")
    checkpoint = load_checkpoint(tmp_path / "qwen.gguf")
    assert checkpoint.config == qwen2
    assert_same_tensors(checkpoint.tensors, tensors)


def test_gguf_quantized_tensors_are_dequantized_to_float32(tmp_path: Path) -> None:
    tensors = random_tensors(TINY)
    quantized = {"model.embed_tokens.weight": GGMLQuantizationType.Q8_0,
                 "model.layers.0.mlp.up_proj.weight": GGMLQuantizationType.Q4_1,
                 "model.layers.0.mlp.gate_proj.weight": GGMLQuantizationType.F16}
    write_gguf(tmp_path / "quantized.gguf", TINY, tensors, quantized=quantized)
    loaded = load_checkpoint(tmp_path / "quantized.gguf").tensors
    for name, ggml_type in quantized.items():
        stored = gguf.quants.quantize(tensors[name].numpy(), ggml_type)
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], torch.from_numpy(gguf.quants.dequantize(stored, ggml_type)))
        assert torch.allclose(loaded[name], tensors[name], atol=0.3)


def test_gguf_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, head_dim=64, num_heads=2, num_kv_heads=1, hidden_size=128,
                                 rope_theta=500_000.0, max_position_embeddings=131072)
    write_gguf(tmp_path / "llama3.gguf", config, random_tensors(config),
               rope_factors=llama_cpp_rope_factors(config, LLAMA32_SCALING))
    checkpoint = load_checkpoint(tmp_path / "llama3.gguf")
    assert checkpoint.config.rope_scaling == LLAMA32_SCALING
    assert "rope_freqs.weight" not in checkpoint.tensors


def test_gguf_tokenizer_comes_from_the_metadata(tmp_path: Path) -> None:
    write_gguf(tmp_path / "tiny.gguf", TINY, random_tensors(TINY))
    tokenizer = load_checkpoint(tmp_path / "tiny.gguf").tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.add_bos_token) == (
        BOS_ID, frozenset({EOS_ID, EOT_ID}), True)
    assert tokenizer.encode("a t<|eot|>") == [BOS_ID, TOKENS.index("a"), TOKENS.index("Ġt"), EOT_ID]
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<user>hi</s>"


@pytest.mark.parametrize(("metadata", "message"), [
    ({"llama.rope.scaling.type": "yarn"}, "rope scaling type 'yarn'"),
    ({"tokenizer.ggml.pre": "mystery"}, "unsupported pre-tokenizer 'mystery'"),
])
def test_gguf_features_we_cannot_run_are_refused(tmp_path: Path, metadata: dict[str, str], message: str) -> None:
    write_gguf(tmp_path / "odd.gguf", TINY, random_tensors(TINY), extra_metadata=metadata)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "odd.gguf")


def test_truncated_gguf_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "whole.gguf", TINY, random_tensors(TINY))
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "whole.gguf").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.gguf")


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "gemma.gguf", TINY, random_tensors(TINY), architecture="gemma")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
        load_checkpoint(tmp_path / "gemma.gguf")


# --- Hugging Face folders ---------------------------------------------------------------------

def hf_config_json(config: LlamaConfig, architecture: str = "LlamaForCausalLM", **overrides: Any) -> dict[str, Any]:
    return {"architectures": [architecture], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "bfloat16", **overrides}


def write_hf_folder(folder: Path, config_json: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                    num_shards: int = 1, tokenizer_config: dict[str, Any] | None = None,
                    generation_config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json))
    if num_shards == 1:
        save_file(tensors, folder / "model.safetensors")
    else:
        names = sorted(tensors)
        weight_map = {}
        for shard in range(num_shards):
            file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[shard::num_shards]}
            save_file(part, folder / file_name)
            weight_map |= dict.fromkeys(part, file_name)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    byte_level_bpe(TOKENS, MERGES, pre_tokenizer="default", special_tokens=SPECIAL_TOKENS).save(
        str(folder / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or settings))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.mark.parametrize("num_shards", [1, 3])
def test_hf_folder_round_trip(tmp_path: Path, num_shards: int) -> None:
    tensors = random_tensors(TINY, torch.bfloat16)
    folder = write_hf_folder(tmp_path / "Tiny-Llama-1B.v2", hf_config_json(TINY), tensors, num_shards=num_shards,
                             generation_config={"eos_token_id": [EOS_ID, EOT_ID]})
    checkpoint = load_checkpoint(folder)
    assert checkpoint.config == TINY
    assert_same_tensors(checkpoint.tensors, tensors)
    assert (checkpoint.name, checkpoint.source) == ("tiny-llama-1b", folder)
    tokenizer = checkpoint.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_ids, tokenizer.add_bos_token) == (
        BOS_ID, EOS_ID, frozenset({EOS_ID, EOT_ID}), False)
    assert tokenizer.encode("a t") == [TOKENS.index("a"), TOKENS.index("Ġt")]
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<user>hi</s>"


def test_hf_qwen2_has_attention_bias(tmp_path: Path) -> None:
    qwen2 = dataclasses.replace(TINY, attention_bias=True)
    tensors = random_tensors(qwen2, torch.bfloat16)
    checkpoint = load_checkpoint(write_hf_folder(tmp_path / "qwen", hf_config_json(qwen2, "Qwen2ForCausalLM"), tensors))
    assert checkpoint.config.attention_bias
    assert_same_tensors(checkpoint.tensors, tensors)


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}},
    {"rope_theta": None, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 32.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}},
])
def test_hf_llama3_rope_scaling(tmp_path: Path, rope: dict[str, Any]) -> None:
    config_json = {key: value for key, value in (hf_config_json(TINY) | rope).items() if value is not None}
    checkpoint = load_checkpoint(write_hf_folder(tmp_path / "llama3", config_json, random_tensors(TINY)))
    assert checkpoint.config == dataclasses.replace(TINY, rope_scaling=LLAMA32_SCALING)


def test_hf_tied_head_saved_twice_is_dropped_but_a_different_one_kept(tmp_path: Path) -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    tensors = random_tensors(tied)
    duplicate = tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    different = tensors | {"lm_head.weight": torch.zeros_like(tensors["model.embed_tokens.weight"])}
    assert "lm_head.weight" not in load_checkpoint(
        write_hf_folder(tmp_path / "duplicate", hf_config_json(tied), duplicate)).tensors
    assert "lm_head.weight" in load_checkpoint(
        write_hf_folder(tmp_path / "different", hf_config_json(tied), different)).tensors


def test_hf_mistral_sliding_window_bounds_the_context(tmp_path: Path) -> None:
    config_json = hf_config_json(TINY, "MistralForCausalLM", sliding_window=128)
    checkpoint = load_checkpoint(write_hf_folder(tmp_path / "mistral", config_json, random_tensors(TINY)))
    assert checkpoint.config.max_position_embeddings == 128


def test_hf_chat_template_file_and_post_processor_bos(tmp_path: Path) -> None:
    settings = {"bos_token": "<s>", "eos_token": "</s>"}  # no add_bos_token: the post-processor decides
    folder = write_hf_folder(tmp_path / "llama", hf_config_json(TINY), random_tensors(TINY), tokenizer_config=settings)
    (folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    backend = byte_level_bpe(TOKENS, MERGES, pre_tokenizer="default", special_tokens=SPECIAL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = load_checkpoint(folder).tokenizer
    assert tokenizer.add_bos_token
    assert tokenizer.encode("a") == [BOS_ID, TOKENS.index("a")]
    assert tokenizer.encode_chat([{"role": "user", "content": "a"}]) == [BOS_ID, TOKENS.index("a")]


def test_bad_paths_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_checkpoint(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a .gguf file nor a Hugging Face model folder"):
        load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="neither a .gguf file nor a Hugging Face model folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "fake.gguf").write_bytes(b"not really a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_checkpoint(tmp_path / "fake.gguf")


def test_incomplete_hf_folders_give_clear_errors(tmp_path: Path) -> None:
    folder = write_hf_folder(tmp_path / "model", hf_config_json(TINY), random_tensors(TINY), num_shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard .* is missing"):
        load_checkpoint(folder)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(hf_config_json(TINY, "GPT2LMHeadModel")))
    with pytest.raises(ValueError, match="unsupported architectures \\['GPT2LMHeadModel'\\]"):
        load_checkpoint(folder)


def test_hf_folder_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    folder = write_hf_folder(tmp_path / "model", hf_config_json(TINY), random_tensors(TINY))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_checkpoint(folder)


# --- The real SmolLM2-135M-Instruct GGUF ----------------------------------------------------------

@pytest.mark.slow
def test_smollm2_config(smollm2: Checkpoint, smollm2_gguf: Path) -> None:
    assert smollm2.config == LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=100_000.0, rope_scaling=None, max_position_embeddings=8192,
        tie_word_embeddings=True, attention_bias=False)
    assert (smollm2.name, smollm2.source) == ("smollm2-135m-instruct", smollm2_gguf)
    assert smollm2_gguf == default_model_path()


@pytest.mark.slow
def test_smollm2_weights_equal_transformers(smollm2: Checkpoint, hf_reference) -> None:
    # Equal Q and K prove the rotary permutation is undone: the other weights would match without it.
    expected = hf_reference.model.state_dict()
    assert expected.keys() - smollm2.tensors.keys() == {"lm_head.weight"}  # tied: transformers lists it twice
    for name, tensor in smollm2.tensors.items():
        assert tensor.dtype == torch.float32, name
        if not torch.equal(tensor, expected[name]):  # they are bit-identical; assert_close is slow
            torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_smollm2_loads_in_seconds(smollm2_gguf: Path) -> None:
    start = time.perf_counter()
    load_checkpoint(smollm2_gguf)
    assert time.perf_counter() - start < 30  # generous: a few seconds on a laptop


@pytest.mark.slow
def test_hf_folder_with_the_smollm2_tokenizer(tmp_path: Path, smollm2: Checkpoint) -> None:
    folder = write_hf_folder(tmp_path / "smol", hf_config_json(TINY), random_tensors(TINY), tokenizer_config={
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": smollm2.tokenizer.chat_template})
    smollm2.tokenizer.backend.save(str(folder / "tokenizer.json"))
    tokenizer = load_checkpoint(folder).tokenizer
    conversation = [{"role": "user", "content": "Hé 👋 12 日本"}]
    assert tokenizer.encode_chat(conversation) == smollm2.tokenizer.encode_chat(conversation)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (1, frozenset({2}))
