"""Quantization on SmolLM2, this machine's CPU: int8 weights against fp32.

1. Decode tokens/s at 1 and 16 concurrent streams, int8 vs fp32 weights
   (the same engine, prompts and KV cache; alternating runs, medians), and
   the single stream against the memory-bandwidth limit of each (bandwidth
   measured in the run over the weight bytes a decode step reads).
2. Memory: weight bytes int8/fp32, as the worker holds them and as parameter
   bytes; KV bytes per token fp8/fp32 and int8/fp32.
3. Perplexity of every configuration on the tests' public-domain English text.

Decode throughput excludes the prefill: N streams x (T - 1) tokens over
time(N streams, T tokens) - time(N streams, 1 token).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from bench.common import DEVICE_THREAD, memory_read_gb_per_s, on_device, print_results
from bench.engine import ours_seconds, stream_prompts
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.scheduler import SchedulerConfig
from workers.loader import default_model_path, load_checkpoint
from workers.model_runner import ModelRunner
from workers.worker import Worker

TEXT = Path(__file__).parent.parent / "tests" / "workers" / "data" / "english.txt"
PERPLEXITY_CONFIGS = {
    "fp32": {"weights": "fp32"},
    "int8": {"weights": "int8"},
    "fp32_kv_fp8": {"weights": "fp32", "kv_cache_dtype": "fp8_e4m3"},
    "fp32_kv_int8": {"weights": "fp32", "kv_cache_dtype": "int8"},
    "int8_kv_fp8": {"weights": "int8", "kv_cache_dtype": "fp8_e4m3"},
    "int8_kv_int8": {"weights": "int8", "kv_cache_dtype": "int8"},
}


def decode_tokens_per_s(workers: dict[str, Worker], num_streams: int, num_tokens: int,
                        repeats: int) -> dict[str, float]:
    """Each worker's decode tokens/s with num_streams streams, median of alternating runs."""
    prompts = stream_prompts(next(iter(workers.values())), num_streams)

    def run(worker: Worker, n: int) -> float:
        # The workers share one device thread, so one engine runs at a time.
        worker.start()
        try:
            return ours_seconds(worker, prompts, n)
        finally:
            worker.engine.stop()
    for worker in workers.values():
        run(worker, 2)
    seconds: dict[str, list[float]] = {name: [] for name in workers}
    for _ in range(repeats):
        for name, worker in workers.items():
            seconds[name].append(run(worker, num_tokens) - run(worker, 1))
    return {name: num_streams * (num_tokens - 1) / statistics.median(s) for name, s in seconds.items()}


def perplexities(checkpoint, num_tokens: int) -> dict[str, float]:  # noqa: ANN001
    ids = checkpoint.tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:num_tokens]
    out = {}
    for name, config in PERPLEXITY_CONFIGS.items():
        runner = ModelRunner(checkpoint, RunnerConfig(device="cpu", kv_cache_memory_bytes=256 << 20, **config))
        out[name] = math.exp(-runner.prompt_logprobs(ids).mean().item())
        del runner
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, repeats and perplexity tokens")
    args = parser.parse_args()
    num_tokens, repeats, ppl_tokens = (16, 1, 600) if args.quick else (64, 3, 100_000)

    checkpoint = on_device(load_checkpoint, default_model_path())
    scheduler = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)
    workers = {weights: Worker(WorkerConfig(runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=256 << 20,
                                                                weights=weights), scheduler=scheduler),
                               checkpoint, device_thread=DEVICE_THREAD)
               for weights in ("fp32", "int8")}
    single = decode_tokens_per_s(workers, 1, num_tokens, repeats)
    streams16 = decode_tokens_per_s(workers, 16, num_tokens, repeats)
    fp32, int8 = workers["fp32"].runner, workers["int8"].runner
    kv = {name: on_device(lambda kv_dtype: ModelRunner(checkpoint, RunnerConfig(
              device="cpu", kv_cache_memory_bytes=1 << 20, weights="fp32", kv_cache_dtype=kv_dtype)).kv_bytes_per_token,
              name)
          for name in ("fp32", "fp8_e4m3", "int8")}
    bandwidth = on_device(memory_read_gb_per_s)
    limit = {name: bandwidth * 1e9 / w.runner.decode_bytes_per_step for name, w in workers.items()}
    parameter_bytes_fp32 = 4 * fp32.parameter_count
    ppl = on_device(perplexities, checkpoint, ppl_tokens)

    figures: dict[str, object] = {
        "bench": "quantization", "model": workers["fp32"].model_name, "device": "cpu",
        "threads": torch.get_num_threads(), "new_tokens": num_tokens,
        "int8_kernel": int8.linear_kernel, "fp32_kernel": fp32.linear_kernel,
        "fp32_single_stream_tokens_per_s": round(single["fp32"], 1),
        "int8_single_stream_tokens_per_s": round(single["int8"], 1),
        "int8_vs_fp32_single_stream": round(single["int8"] / single["fp32"], 3),
        "fp32_streams16_tokens_per_s": round(streams16["fp32"], 1),
        "int8_streams16_tokens_per_s": round(streams16["int8"], 1),
        "int8_vs_fp32_streams16": round(streams16["int8"] / streams16["fp32"], 3),
        "memory_read_gb_per_s": round(bandwidth, 1),
        "fp32_single_stream_of_limit": round(single["fp32"] / limit["fp32"], 3),
        "int8_single_stream_of_limit": round(single["int8"] / limit["int8"], 3),
        "weight_bytes_fp32": fp32.weight_bytes, "weight_bytes_int8": int8.weight_bytes,
        "weight_bytes_int8_vs_fp32": round(int8.weight_bytes / fp32.weight_bytes, 3),
        "weight_bytes_int8_vs_fp32_parameters": round(int8.weight_bytes / parameter_bytes_fp32, 3),
        "kv_bytes_per_token_fp32": kv["fp32"],
        "kv_bytes_fp8_vs_fp32": round(kv["fp8_e4m3"] / kv["fp32"], 4),
        "kv_bytes_int8_vs_fp32": round(kv["int8"] / kv["fp32"], 4),
        "perplexity_tokens": min(ppl_tokens, len(checkpoint.tokenizer.encode(TEXT.read_text(encoding="utf-8")))),
    }
    figures |= {f"perplexity_{name}": round(value, 4) for name, value in ppl.items()}
    figures |= {f"perplexity_{name}_vs_fp32": round(value / ppl["fp32"], 4) for name, value in ppl.items()}
    rows = [
        ("kernels", f"int8: {int8.linear_kernel}; fp32: {fp32.linear_kernel} (measured at load)"),
        ("1 stream", f"int8 {single['int8']:.1f} vs fp32 {single['fp32']:.1f} tokens/s: "
                     f"{single['int8'] / single['fp32']:.2f}x"),
        ("16 streams", f"int8 {streams16['int8']:.1f} vs fp32 {streams16['fp32']:.1f} tokens/s: "
                       f"{streams16['int8'] / streams16['fp32']:.2f}x"),
        ("bandwidth limit, 1 stream", f"{bandwidth:.1f} GB/s: int8 {limit['int8']:.0f} tokens/s "
                                      f"({single['int8'] / limit['int8']:.0%} reached), fp32 {limit['fp32']:.0f} "
                                      f"({single['fp32'] / limit['fp32']:.0%})"),
        ("weight bytes", f"int8 {int8.weight_bytes / 1e6:.1f} MB vs fp32 {fp32.weight_bytes / 1e6:.1f} MB as held "
                         f"({int8.weight_bytes / fp32.weight_bytes:.3f}), vs {parameter_bytes_fp32 / 1e6:.1f} MB "
                         f"of fp32 parameters ({int8.weight_bytes / parameter_bytes_fp32:.3f})"),
        ("KV bytes per token", f"fp32 {kv['fp32']}, fp8 {kv['fp8_e4m3']} ({kv['fp8_e4m3'] / kv['fp32']:.2f}), "
                               f"int8 {kv['int8']} ({kv['int8'] / kv['fp32']:.3f})"),
    ]
    rows += [(f"perplexity {name}", f"{value:.3f} ({value / ppl['fp32'] - 1:+.1%})") for name, value in ppl.items()]
    print_results(f"quantization, {workers['fp32'].model_name}, CPU, {num_tokens} new tokens", rows, figures)


if __name__ == "__main__":
    main()
