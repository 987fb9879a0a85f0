"""scripts/gpu_check.sh, the check a GPU machine runs: its dry run goes through every section on the
CPU, with only the packages the GPU machine has and the wheels carried to it, so neither the check
nor its wheel list rots before a GPU runs them (docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The driver, imported in this process (it imports only the standard library at the top)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    # The check's own budget ends its children well before this test's timeout would.
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "180"}
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_dry_run_runs_every_section_and_ends_with_its_figures(dry_run) -> None:  # noqa: ANN001
    result, summary = dry_run
    for title in ("gpu-marked tests", "logits on the device vs the CPU", "decode cases", "decode, 8-token prompts"):
        assert title in result.stdout
    assert summary["bench"] == "gpu_check" and summary["mode"] == "dry-run"
    assert summary["ok"] is True and summary["errors"] == []
    assert summary["hardware_class"] == "cpu" and summary["read_gb_per_s"] > 0


def test_gpu_tests_run_and_skip_without_a_gpu(dry_run) -> None:  # noqa: ANN001
    _, summary = dry_run
    assert summary["gpu_tests_skipped"] >= 2
    assert not summary.get("gpu_tests_failed") and not summary.get("gpu_tests_errors")


def test_logits_are_compared_in_fp32_bf16_and_through_the_paged_cache(dry_run) -> None:  # noqa: ANN001
    _, summary = dry_run
    for path in ("forward_fp32", "forward_bf16", "paged-logprobs_fp32"):
        assert summary[f"logits_{path}_ok"] is True
        assert summary[f"logits_{path}_max_abs_diff"] >= 0
    assert summary["logits_ok"] is True


def test_decode_is_measured_for_both_shapes_and_weight_formats(dry_run) -> None:  # noqa: ANN001
    _, summary = dry_run
    # A dry run pairs SmolLM2's shape with bf16 weights and Llama-3.1-8B's with int8, eager only.
    for model, weights in (("smollm2-135m", "bf16"), ("llama-3.1-8b", "int8")):
        key = f"{model}_{weights}_eager"
        assert summary[f"{key}_execution"] == "eager"
        for streams in (1, 4):
            assert summary[f"{key}_streams{streams}_tokens_per_s"] > 0
            assert summary[f"{key}_streams{streams}_bandwidth_of_measured_read"] > 0
            assert summary[f"{key}_streams{streams}_bandwidth_of_limit"] is None  # no datasheet figure for a CPU


def test_cases_that_do_not_fit_the_budget_are_reported_skipped(gpu_check: ModuleType,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    plan = gpu_check.GPU_PLAN
    decode = gpu_check.run_decode_section(plan, gpu_check.Budget(0.0), env={})
    device = gpu_check.ChildResult([], None)
    tests = gpu_check.TestsResult({"skipped": 1}, "1 skipped", None)
    gpu_check.Report(plan, tests, device, decode, elapsed_s=0.0).print()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["skipped"]) == len(plan.models) * len(plan.weights) * len(plan.executions) == 8
    assert all("of the budget left" in reason for reason in summary["skipped"])


def test_the_carried_wheels_are_pinned_to_this_environment(gpu_check: ModuleType) -> None:
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "--wheel-requirements"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == len(gpu_check.CARRIED_PACKAGES)
    assert all("==" in requirement for requirement in out)
