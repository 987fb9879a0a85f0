"""Single-stream decode speed: the Fareway worker vs Hugging Face transformers,
both running the same SmolLM2 GGUF on this machine's CPU in fp32.

Decode tokens/s excludes the prefill: ours is (n - 1) tokens over the time
from the first token to the last; transformers' is (n - 1) tokens over
generate(n) minus generate(1). The two alternate, after a warm-up, and the
medians are compared. The limit is the machine's: a decode step must read
every weight once (the embedding table aside: one row), so tokens/s <=
memory bandwidth / weight bytes read per step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import torch

from bench.common import (
    DEVICE_THREAD,
    engines_paused,
    matmul_gflop_per_s,
    memory_read_gb_per_s,
    on_device,
    print_results,
)
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.sequence import SamplingOptions
from workers.loader import default_model_path
from workers.worker import Worker

# A prompt whose greedy continuation runs on (it keeps counting), so both
# sides generate the full number of tokens.
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


def ours_tokens_per_s(worker: Worker, prompt_ids: list[int], num_tokens: int) -> float:
    async def run() -> float:
        first = last = 0.0
        count = 0
        async for output in worker.async_engine.generate(prompt_ids, SamplingOptions(num_tokens, temperature=0)):
            if output.token_ids:
                count += len(output.token_ids)
                last = time.perf_counter()
                first = first or last
        if count < num_tokens:
            raise RuntimeError(f"the worker stopped after {count} of {num_tokens} tokens")
        return (count - 1) / (last - first)
    return asyncio.run(run())


def transformers_tokens_per_s(model, prompt_ids: list[int], num_tokens: int) -> float:  # noqa: ANN001
    ids = torch.tensor([prompt_ids])

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start
    return (num_tokens - 1) / (generate(num_tokens) - generate(1))


def load_transformers(path):  # noqa: ANN001, ANN201
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (~30 s after loading)")
    args = parser.parse_args()
    num_tokens, repeats = (32, 2) if args.quick else (128, 5)

    path = default_model_path()
    worker = Worker(WorkerConfig(runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=64 << 20, weights="fp32")),
                    device_thread=DEVICE_THREAD)
    reference = on_device(load_transformers, path)
    worker.start()
    prompt_ids = worker.tokenizer.encode(PROMPT)

    def theirs_tokens_per_s(n: int) -> float:
        with engines_paused(worker):
            return on_device(transformers_tokens_per_s, reference, prompt_ids, n)
    ours_tokens_per_s(worker, prompt_ids, 8)  # warm-up
    theirs_tokens_per_s(8)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(ours_tokens_per_s(worker, prompt_ids, num_tokens))
        theirs.append(theirs_tokens_per_s(num_tokens))
    worker.stop()

    ours_median, theirs_median = sorted(ours)[len(ours) // 2], sorted(theirs)[len(theirs) // 2]
    bandwidth = on_device(memory_read_gb_per_s)
    weight_bytes = worker.runner.decode_bytes_per_step
    limit = bandwidth * 1e9 / weight_bytes
    figures = {
        "bench": "worker_decode",
        "model": worker.model_name,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "new_tokens": num_tokens,
        "tokens_per_s": round(ours_median, 2),
        "transformers_tokens_per_s": round(theirs_median, 2),
        "single_stream_vs_transformers": round(ours_median / theirs_median, 3),
        "memory_read_gb_per_s": round(bandwidth, 2),
        "matmul_gflop_per_s": round(on_device(matmul_gflop_per_s), 1),
        "decode_bytes_per_step": weight_bytes,
        "bandwidth_limit_tokens_per_s": round(limit, 2),
        "tokens_per_s_of_limit": round(ours_median / limit, 3),
    }
    rows = [
        ("Fareway worker", f"{ours_median:.1f} tokens/s  (runs: {', '.join(f'{x:.1f}' for x in ours)})"),
        ("transformers generate", f"{theirs_median:.1f} tokens/s  (runs: {', '.join(f'{x:.1f}' for x in theirs)})"),
        ("ours vs transformers", f"{ours_median / theirs_median:.2f}x"),
        ("machine limit", f"{limit:.1f} tokens/s = {bandwidth:.1f} GB/s / {weight_bytes / 1e6:.0f} MB of weights read per step"),
        ("ours vs the limit", f"{ours_median / limit:.0%}"),
    ]
    print_results(f"single-stream decode, {worker.model_name}, fp32 CPU, {num_tokens} new tokens", rows, figures)


if __name__ == "__main__":
    main()
