"""`fareway plan`: presets, model files, hardware, fitting, prices and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook
from cli.main import main
from cli.planner import (
    GIB,
    HARDWARE,
    PRESETS,
    Deployment,
    PlanSettings,
    deployments,
    device_hour_price,
    parse_compare,
    plan,
    resolve_hardware,
    resolve_model,
)
from workers.models.config_files import read_model_config

H100 = Deployment("nvidia-h100", "bf16", "bf16")


def test_the_smollm2_gguf_reads_as_its_preset() -> None:
    from workers.loader import default_model_path

    path = default_model_path()
    assert read_model_config(path) == PRESETS["smollm2-135m"]
    assert resolve_model(str(path)) == ("smollm2-135m-instruct", PRESETS["smollm2-135m"])


def test_a_hugging_face_config_json_reads_as_its_preset(tmp_path: Path) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
              "tie_word_embeddings": False, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    folder = tmp_path / "Llama-3.1-8B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(folder)) == ("llama-3", PRESETS["llama-3.1-8b"])


@pytest.mark.parametrize(("spec", "preset"), [("Llama-3.1-70B", "llama-3.1-70b"),
                                              ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
                                              ("mistral-7b", "mistral-7b-v0.3"),
                                              ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m")])
def test_presets_by_their_published_names(spec: str, preset: str) -> None:
    assert resolve_model(spec) == (preset, PRESETS[preset])


def test_an_unknown_model_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="llama-3.1-8b, llama-3.1-70b, mistral-7b-v0.3, qwen2.5-72b, smollm2-135m"):
        resolve_model("gpt-5")


@pytest.mark.parametrize(("name", "cls"), [("H100", "nvidia-h100"), ("h100-80gb", "nvidia-h100"),
                                           ("MI300X", "amd-mi300x"), ("nvidia-l4", "nvidia-l4"),
                                           ("NVIDIA H200", "nvidia-h200"), ("cpu", "cpu")])
def test_hardware_aliases(name: str, cls: str) -> None:
    assert resolve_hardware(name) == cls


def test_unknown_hardware_lists_the_classes() -> None:
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v5'; choose one of: nvidia-h100, nvidia-h200"):
        resolve_hardware("tpu-v5")


def test_kv_dtype_defaults_to_the_compute_dtype() -> None:
    assert Deployment.from_names("h100", "float16", None, 1).kv_dtype == "fp16"
    assert Deployment.from_names("h100", "int8", "auto", "2") == Deployment("nvidia-h100", "int8", "bf16", 2)
    assert Deployment.from_names("cpu", "int8", None, 1).kv_dtype == "fp32"
    assert Deployment.from_names("cpu", None, None, 1) == Deployment("cpu", "fp32", "fp32")
    assert Deployment.from_names("l4", "auto", "auto", 1) == Deployment("nvidia-l4", "bf16", "bf16")


def test_llama_8b_on_one_h100() -> None:
    p = plan(PRESETS["llama-3.1-8b"], H100, PlanSettings(context_length_tokens=4096), 2.49)
    usable = int(80 * GIB * 0.9)
    assert p.weight_bytes_per_device == 2 * PRESETS["llama-3.1-8b"].num_parameters
    assert p.kv_cache_bytes_per_device == usable - p.weight_bytes_per_device - GIB
    assert p.kv_capacity_tokens == p.kv_cache_bytes_per_device // (131072 * 16) * 16
    assert p.max_concurrent_sequences == p.kv_capacity_tokens // 4096
    assert p.fits_one_sequence


def test_70b_in_16_bits_does_not_fit_one_l4() -> None:
    p = plan(PRESETS["llama-3.1-70b"], Deployment("nvidia-l4", "fp16", "fp16"), PlanSettings(), 0.71)
    assert not p.fits_weights and not p.fits_one_sequence
    assert p.kv_capacity_tokens == p.max_concurrent_sequences == 0


def test_weights_that_fit_may_leave_no_room_for_a_long_conversation() -> None:
    # 8B bf16 on an L4: 21.6 GiB usable, 15 GiB of weights, ~5.6 GiB of KV < 131072 x 128 KiB.
    p = plan(PRESETS["llama-3.1-8b"], Deployment("nvidia-l4", "bf16", "bf16"),
             PlanSettings(context_length_tokens=131072), 0.71)
    assert p.fits_weights and not p.fits_one_sequence


def test_a_context_longer_than_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the model's 8192 tokens"):
        plan(PRESETS["smollm2-135m"], H100, PlanSettings(context_length_tokens=8193), 2.49)


def test_price_per_million_tokens_from_a_stated_throughput() -> None:
    p = plan(PRESETS["llama-3.1-8b"], Deployment("nvidia-h100", "bf16", "bf16", 2),
             PlanSettings(tokens_per_second=1000), 2.49)
    # Two devices at $2.49 an hour make 3.6M tokens an hour.
    assert p.usd_per_replica_hour == pytest.approx(4.98)
    assert p.usd_per_million_tokens == pytest.approx(4.98 / 3.6)
    assert plan(PRESETS["llama-3.1-8b"], H100, PlanSettings(), 2.49).usd_per_million_tokens is None


def test_prices_come_from_the_price_book() -> None:
    book = PriceBook.load(DEFAULT_PRICE_BOOK)
    assert device_hour_price("amd-mi300x", book, at=2e9) == 2.19
    assert device_hour_price("nvidia-h100", PriceBook("empty"), at=2e9) == HARDWARE["nvidia-h100"].usd_per_device_hour


def test_compare_is_the_product_of_the_listed_values() -> None:
    axes = parse_compare(["weights=fp16,int8", "kv=fp16,fp8_e4m3", "hardware=h100,mi300x", "tp=4"])
    plans = deployments({"hardware": "h100", "weights": "bf16", "kv": None, "tensor_parallel_size": 1}, axes)
    assert len(plans) == 8
    assert plans[0] == Deployment("nvidia-h100", "fp16", "fp16", 4)
    assert plans[-1] == Deployment("amd-mi300x", "int8", "fp8_e4m3", 4)


@pytest.mark.parametrize(("items", "message"), [(["batch=1,2"], "AXIS one of: hardware, weights, kv, tp"),
                                                (["tp=2", "tp=4"], "twice"), (["kv="], "no values")])
def test_compare_refuses_bad_axes(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compare(items)


def test_plan_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--hardware", "H100", "--tokens-per-second", "2000"]) == 0
    out = capsys.readouterr().out
    assert "1 x nvidia-h100, weights int8, KV bf16" in out  # the worker's defaults: int8 weights, KV in bf16
    assert "131,072" in out
    assert f"{2.49 / (2000 * 3600) * 1e6:.4f}" in out


def test_plan_compare_prints_one_row_per_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-70b", "--compare", "weights=fp16,int8", "hardware=h100,mi300x",
                 "tp=4", "--context-length", "5000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("4 x ")]) == 4


def test_plan_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('version = "test"\n[[hardware]]\nclass = "nvidia-h100"\nusd_per_device_hour = 4.0\n'
                      'effective_from = 2020-01-01\n')
    assert main(["plan", "--model", "smollm2-135m", "--json", "--prices", str(prices),
                 "--compare", "tp=1,3", "kv=fp16,int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "smollm2-135m"
    assert [(p["tensor_parallel_size"], p["kv_dtype"]) for p in result["plans"]] == [
        (1, "fp16"), (1, "int8"), (3, "fp16"), (3, "int8")]
    assert [p["kv_bytes_per_token_per_device"] for p in result["plans"]] == [
        23040, 2 * 30 * 3 * (64 + 4), 7680, 2 * 30 * (64 + 4)]
    assert {p["usd_per_device_hour"] for p in result["plans"]} == {4.0}
    assert all(p["fits_one_sequence"] for p in result["plans"])


def test_plan_price_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "smollm2-135m", "--hardware", "cpu", "--memory-gib", "8", "--json",
                 "--usd-per-device-hour", "0.5", "--tokens-per-second", "100"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["plans"]
    assert result["memory_bytes_per_device"] == 8 * GIB
    assert result["weight_dtype"] == "int8" and result["kv_dtype"] == "fp32"  # as a CPU worker runs by default
    assert result["usd_per_million_tokens"] == pytest.approx(0.5 / 0.36)


@pytest.mark.parametrize(("argv", "message"), [
    (["--hardware", "tpu-v5"], "unknown hardware 'tpu-v5'; choose one of: nvidia-h100"),
    (["--weights", "fp8"], "unknown dtype 'fp8'; choose one of: fp32, fp16, bf16, int8"),
    (["--kv-cache-dtype", "int4"], "choose one of: fp32, fp16, bf16, fp8_e4m3, int8"),
    (["--tensor-parallel-size", "3"], "does not divide"),
])
def test_plan_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fareway plan: ") and message in err and err.count("\n") == 1
