"""The compiled decode step (workers/decode_step.py) against the eager one, SmolLM2 on this CPU.

Four workers, fp32 and int8 weights, each eager and compiled, and Hugging Face `transformers`
(fp32, static batching), decode at 1, 16 and 64 streams, alternating runs, medians. Printed:

- int8, one stream, against its memory-bandwidth limit (bandwidth measured in the run over the
  weight bytes a decode step reads), compiled and eager;
- int8 against fp32 at 16 streams;
- 16 streams against transformers;
- 64 streams against the compute limit (the fp32 matmul rate measured in the run over the
  model's FLOPs per token);
- each worker's compile time at load (served from inductor's on-disk cache when an earlier run
  compiled the same model: the second run of this script shows it).

Decode throughput excludes the prefill: N streams x (T - 1) tokens over
time(N streams, T tokens) - time(N streams, 1 token).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import DEVICE_THREAD, matmul_gflop_per_s, memory_read_gb_per_s, on_device, print_results
from bench.engine import ours_seconds, stream_prompts, transformers_seconds
from bench.worker_decode import load_transformers
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.meter import WorkModel
from workers.engine.scheduler import SchedulerConfig
from workers.loader import default_model_path, load_checkpoint
from workers.worker import Worker

CONFIGS = {"fp32 eager": ("fp32", True), "fp32 compiled": ("fp32", False),
           "int8 eager": ("int8", True), "int8 compiled": ("int8", False)}


def throughputs(runs: dict[str, Callable[[int], float]], num_streams: int, num_tokens: int,
                repeats: int) -> dict[str, float]:
    """Each run's decode tokens/s at num_streams, medians of alternating runs (`runs[name](T)` times T
    tokens of every stream)."""
    for run in runs.values():
        run(2)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(run(num_tokens) - run(1))
    return {name: num_streams * (num_tokens - 1) / statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    args = parser.parse_args()
    num_tokens, repeats = (16, 1) if args.quick else (48, 3)

    path = default_model_path()
    checkpoint = on_device(load_checkpoint, path)
    scheduler = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)
    workers: dict[str, Worker] = {}
    load_seconds: dict[str, float] = {}
    for name, (weights, eager) in CONFIGS.items():
        started = time.perf_counter()
        workers[name] = Worker(WorkerConfig(
            runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=512 << 20, weights=weights, enforce_eager=eager),
            scheduler=scheduler), checkpoint, device_thread=DEVICE_THREAD)
        load_seconds[name] = time.perf_counter() - started
    reference = on_device(load_transformers, path)

    def ours(worker: Worker, prompts: list[list[int]]) -> Callable[[int], float]:
        def run(n: int) -> float:
            worker.start()   # one engine at a time: they share the device thread
            try:
                return ours_seconds(worker, prompts, n)
            finally:
                worker.engine.stop()
        return run

    results: dict[int, dict[str, float]] = {}
    for num_streams in (1, 16, 64):
        prompts = stream_prompts(next(iter(workers.values())), num_streams)
        runs = {name: ours(worker, prompts) for name, worker in workers.items()}
        if num_streams == 16:
            runs["transformers"] = lambda n, p=prompts: on_device(transformers_seconds, reference, p, n)
        results[num_streams] = throughputs(runs, num_streams, num_tokens, repeats)

    bandwidth = on_device(memory_read_gb_per_s)
    bytes_per_step = {name: w.runner.decode_bytes_per_step for name, w in workers.items()}
    work = WorkModel.for_config(checkpoint.config)
    matmul_rate = on_device(matmul_gflop_per_s)
    compute_limit = matmul_rate * 1e9 / (work.linear_flops_per_token + work.head_flops_per_token)
    one, sixteen, sixty_four = results[1], results[16], results[64]

    def of_bandwidth(name: str) -> float:
        return one[name] * bytes_per_step[name] / (bandwidth * 1e9)

    figures: dict[str, object] = {
        "bench": "decode_step", "model": workers["fp32 eager"].model_name, "device": "cpu",
        "threads": torch.get_num_threads(), "new_tokens": num_tokens,
        "execution": {name: w.runner.execution for name, w in workers.items()},
        "compile_seconds": {name: round(w.runner.decode_step.compile_seconds, 1) for name, w in workers.items()},
        "tokens_per_s": {f"{name} x{n}": round(r[name], 1) for n, r in results.items() for name in r},
        "memory_read_gb_per_s": round(bandwidth, 1), "matmul_gflop_per_s": round(matmul_rate, 1),
        "int8_single_stream_of_bandwidth_limit": round(of_bandwidth("int8 compiled"), 3),
        "int8_eager_single_stream_of_bandwidth_limit": round(of_bandwidth("int8 eager"), 3),
        "int8_vs_fp32_streams16": round(sixteen["int8 compiled"] / sixteen["fp32 compiled"], 3),
        "int8_vs_fp32_streams16_eager": round(sixteen["int8 eager"] / sixteen["fp32 eager"], 3),
        "streams16_vs_transformers": round(sixteen["fp32 compiled"] / sixteen["transformers"], 3),
        "int8_streams16_vs_transformers": round(sixteen["int8 compiled"] / sixteen["transformers"], 3),
        "streams16_eager_vs_transformers": round(sixteen["fp32 eager"] / sixteen["transformers"], 3),
        "streams64_of_compute_limit": round(sixty_four["fp32 compiled"] / compute_limit, 3),
        "streams64_eager_of_compute_limit": round(sixty_four["fp32 eager"] / compute_limit, 3),
        "compiled_vs_eager": {f"{w} x{n}": round(r[f"{w} compiled"] / r[f"{w} eager"], 3)
                              for n, r in results.items() for w in ("fp32", "int8")},
    }
    rows = [(f"{n} stream{'s' * (n > 1)}", ", ".join(f"{name} {r[name]:.1f}" for name in r) + " tokens/s")
            for n, r in results.items()]
    rows += [
        ("compiled vs eager", ", ".join(f"{k} {v:.2f}x" for k, v in figures["compiled_vs_eager"].items())),
        ("int8, 1 stream, of bandwidth limit", f"compiled {of_bandwidth('int8 compiled'):.0%}, eager "
                                               f"{of_bandwidth('int8 eager'):.0%} ({bandwidth:.1f} GB/s over "
                                               f"{bytes_per_step['int8 compiled'] / 1e6:.0f} MB a step; target 40%)"),
        ("int8 vs fp32, 16 streams", f"compiled {figures['int8_vs_fp32_streams16']:.2f}x, eager "
                                     f"{figures['int8_vs_fp32_streams16_eager']:.2f}x (target 1.5x)"),
        ("16 streams vs transformers", f"fp32 compiled {figures['streams16_vs_transformers']:.2f}x, int8 compiled "
                                       f"{figures['int8_streams16_vs_transformers']:.2f}x, fp32 eager "
                                       f"{figures['streams16_eager_vs_transformers']:.2f}x (target 3x)"),
        ("64 streams of compute limit", f"fp32 compiled {figures['streams64_of_compute_limit']:.0%}, eager "
                                        f"{figures['streams64_eager_of_compute_limit']:.0%} ({compute_limit:.0f} "
                                        f"tokens/s at {matmul_rate:.0f} GFLOP/s; target 60%)"),
        ("load (compile) seconds", ", ".join(f"{name} {load_seconds[name]:.1f} "
                                             f"({workers[name].runner.decode_step.compile_seconds:.1f})"
                                             for name in workers)),
    ]
    for worker in workers.values():
        worker.stop()
    print_results(f"decode step, {workers['fp32 eager'].model_name}, CPU, {num_tokens} new tokens", rows, figures)


if __name__ == "__main__":
    main()
