"""The serving engine on SmolLM2, fp32 on this machine's CPU:

1. Aggregate decode throughput with 1, 4, 16 and 64 concurrent streams
   (continuous batching) vs Hugging Face transformers' static batching of the
   same size, on the same GGUF and the same prompts.
2. That throughput vs the machine's compute limit: its fp32 matrix-multiply
   rate (measured in the run) over the model's FLOPs per token.
3. Time to first token of a request whose 1,024-token prefix is in the prefix
   cache vs the same request cold.
4. What structured outputs (a JSON schema) and logprobs (top 5) cost: 16 streams
   with each vs the same 16 streams without, alternating (tokens/s, prefill
   included on both sides; a structured stream ends when its JSON does).

Decode throughput excludes the prefill, the same way for both sides: N
streams x (T - 1) tokens over time(N streams, T tokens) - time(N streams, 1
token). Every measurement alternates ours and the baseline after a warm-up,
and medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
import uuid

import torch

from bench.common import DEVICE_THREAD, engines_paused, matmul_gflop_per_s, on_device, print_results
from bench.worker_decode import load_transformers
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.meter import WorkModel
from workers.engine.scheduler import SchedulerConfig
from workers.engine.sequence import SamplingOptions
from workers.loader import default_model_path
from workers.worker import Worker

PROMPT_TOKENS = 32
PREFIX_TOKENS = 1024


def stream_prompts(worker: Worker, num_streams: int) -> list[list[int]]:
    """num_streams different prompts of PROMPT_TOKENS tokens each (no shared prefix, no padding needed)."""
    prompts = []
    for i in range(num_streams):
        ids = worker.tokenizer.encode(f"Stream {i}: " + ", ".join(str(i * 1000 + n) for n in range(40)))
        prompts.append(ids[:PROMPT_TOKENS])
    return prompts


async def _ours_batch(worker: Worker, prompts: list[list[int]], num_tokens: int) -> float:
    options = SamplingOptions(num_tokens, temperature=0, ignore_eos=True)

    async def one(ids: list[int]) -> int:
        count = 0
        # A fresh salt per run: every run computes its prompts, as transformers does.
        async for output in worker.async_engine.generate(ids, options, cache_salt=uuid.uuid4().hex):
            count += len(output.token_ids)
        return count
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(ids) for ids in prompts))
    elapsed = time.perf_counter() - start
    if min(counts) < num_tokens:
        raise RuntimeError(f"a stream stopped after {min(counts)} of {num_tokens} tokens")
    return elapsed


def ours_seconds(worker: Worker, prompts: list[list[int]], num_tokens: int) -> float:
    return asyncio.run(_ours_batch(worker, prompts, num_tokens))


def transformers_seconds(model, prompts: list[list[int]], num_tokens: int) -> float:  # noqa: ANN001
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + num_tokens
    return time.perf_counter() - start


def decode_throughputs(worker: Worker, model, num_streams: int, num_tokens: int,  # noqa: ANN001
                       repeats: int) -> tuple[float, float]:
    """(ours, transformers) decode tokens/s, medians of alternating runs."""
    prompts = stream_prompts(worker, num_streams)
    def theirs_seconds(n: int) -> float:
        with engines_paused(worker):
            return on_device(transformers_seconds, model, prompts, n)
    ours_seconds(worker, prompts, 2)
    theirs_seconds(2)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(ours_seconds(worker, prompts, num_tokens) - ours_seconds(worker, prompts, 1))
        theirs.append(theirs_seconds(num_tokens) - theirs_seconds(1))
    decoded = num_streams * (num_tokens - 1)
    return decoded / statistics.median(ours), decoded / statistics.median(theirs)


# What a service asks for: a record with a list of items, open-ended enough to run to max_tokens.
BENCH_SCHEMA = json.dumps({
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {"type": "array", "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "label": {"type": "string"},
                           "kind": {"enum": ["alpha", "beta", "gamma"]}},
            "required": ["id", "label", "kind"]}},
    },
    "required": ["title", "items"],
})


async def _tokens_per_s(worker: Worker, prompts: list[list[int]], options: SamplingOptions) -> tuple[float, int]:
    """Generated tokens per second of the streams together (prefill included), and the tokens."""
    async def one(ids: list[int]) -> int:
        count = 0
        async for output in worker.async_engine.generate(ids, options, cache_salt=uuid.uuid4().hex):
            count += len(output.token_ids)
        return count
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(ids) for ids in prompts))
    return sum(counts) / (time.perf_counter() - start), sum(counts)


def option_costs(worker: Worker, num_streams: int, num_tokens: int, repeats: int) -> dict[str, tuple[float, float, int]]:
    """{option: (its tokens/s, plain tokens/s, its tokens)} for 16 streams with a JSON schema and with
    logprobs (top 5), each alternating with the same streams unconstrained and without logprobs."""
    prompts = [worker.tokenizer.encode_chat([{"role": "user", "content": f"List {n + 3} things in a kitchen as JSON."}])
               for n in range(num_streams)]
    plain = SamplingOptions(num_tokens, temperature=0, ignore_eos=True)
    variants = {
        "structured": dataclasses.replace(plain, grammar=worker._compile("json_schema", BENCH_SCHEMA)),
        "logprobs": dataclasses.replace(plain, logprobs=5),
    }
    results = {}
    for name, options in variants.items():
        asyncio.run(_tokens_per_s(worker, prompts, options))  # warm-up (and the grammar's first compile)
        ours, baseline, counts = [], [], []
        for _ in range(repeats):
            rate, count = asyncio.run(_tokens_per_s(worker, prompts, options))
            ours.append(rate)
            counts.append(count)
            baseline.append(asyncio.run(_tokens_per_s(worker, prompts, plain))[0])
        results[name] = (statistics.median(ours), statistics.median(baseline), min(counts))
    return results


async def _ttft_ms(worker: Worker, ids: list[int], salt: str) -> tuple[float, int]:
    async for output in worker.async_engine.generate(ids, SamplingOptions(1, temperature=0), cache_salt=salt):
        if output.finished:
            return output.usage.ttft_ms, output.usage.cached_tokens
    raise RuntimeError("the request ended without a final output")


def prefix_ttft(worker: Worker, repeats: int) -> tuple[float, float, int]:
    """(cold ms, cached ms, cached tokens): a 1,024-token prefix plus a question, alternating."""
    words = " ".join(f"clause {n} of the service agreement applies." for n in range(400))
    prefix = worker.tokenizer.encode(words)[:PREFIX_TOKENS]
    question = worker.tokenizer.encode(" Question: which clause applies first? Answer:")
    ids = prefix + question
    salt = "bench-warm"
    asyncio.run(_ttft_ms(worker, ids, salt))  # puts the prefix in the cache
    cold, warm, cached = [], [], 0
    for _ in range(repeats):
        cold.append(asyncio.run(_ttft_ms(worker, ids, uuid.uuid4().hex))[0])  # a new salt: a guaranteed miss
        ms, cached = asyncio.run(_ttft_ms(worker, ids, salt))
        warm.append(ms)
    return statistics.median(cold), statistics.median(warm), cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer streams, tokens and repeats (~1 min after loading)")
    args = parser.parse_args()
    stream_counts, num_tokens, repeats = ((1, 16, 64), 16, 1) if args.quick else ((1, 4, 16, 64), 64, 3)

    path = default_model_path()
    worker = Worker(WorkerConfig(runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=1 << 30, weights="fp32"),
                                 scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)),
                    device_thread=DEVICE_THREAD)
    reference = on_device(load_transformers, path)
    worker.start()

    throughput: dict[int, tuple[float, float]] = {}
    for n in stream_counts:
        throughput[n] = decode_throughputs(worker, reference, n, num_tokens, repeats)
    cold_ms, warm_ms, cached_tokens = prefix_ttft(worker, 3 if args.quick else 5)
    costs = option_costs(worker, 16, num_tokens if args.quick else 48, 1 if args.quick else 3)
    worker.stop()

    config = worker.runner.model_config
    work = WorkModel.for_config(config)
    flops_per_token = work.linear_flops_per_token + work.head_flops_per_token
    matmul_rate = on_device(matmul_gflop_per_s)
    limit = matmul_rate * 1e9 / flops_per_token

    figures: dict[str, object] = {"bench": "engine", "model": worker.model_name, "device": "cpu", "dtype": "float32",
                                  "threads": torch.get_num_threads(), "prompt_tokens": PROMPT_TOKENS,
                                  "new_tokens": num_tokens}
    rows = []
    for n, (ours, theirs) in throughput.items():
        figures[f"streams{n}_tokens_per_s"] = round(ours, 1)
        figures[f"streams{n}_transformers_tokens_per_s"] = round(theirs, 1)
        figures[f"streams{n}_vs_transformers"] = round(ours / theirs, 3)
        figures[f"streams{n}_throughput_of_limit"] = round(ours / limit, 3)
        rows.append((f"{n} streams", f"{ours:.1f} tokens/s vs transformers {theirs:.1f}: {ours / theirs:.2f}x; "
                                     f"{ours / limit:.0%} of the limit"))
    figures |= {
        "matmul_gflop_per_s": round(matmul_rate, 1),
        "gflop_per_token": round(flops_per_token / 1e9, 4),
        "limit_tokens_per_s": round(limit, 1),
        "prefix_tokens": PREFIX_TOKENS,
        "prefix_cached_tokens": cached_tokens,
        "prefix_cold_ttft_ms": round(cold_ms, 1),
        "prefix_hit_ttft_ms": round(warm_ms, 1),
        "prefix_hit_ttft_speedup": round(cold_ms / warm_ms, 2),
    }
    for name, key in (("structured", "structured_vs_unconstrained_streams16"), ("logprobs", "logprobs_vs_plain_streams16")):
        ours, plain, tokens = costs[name]
        figures[key] = round(ours / plain, 3)
        figures[f"{name}_streams16_tokens_per_s"] = round(ours, 1)
        rows.append((f"16 streams, {'a JSON schema' if name == 'structured' else 'logprobs (top 5)'}",
                     f"{ours:.1f} tokens/s vs {plain:.1f} without: {ours / plain:.2f}x ({tokens} tokens)"))
    rows += [
        ("machine limit", f"{limit:.0f} tokens/s = {matmul_rate:.0f} GFLOP/s fp32 matmul / "
                          f"{flops_per_token / 1e9:.3f} GFLOP per token"),
        ("TTFT, 1,024-token prefix", f"cold {cold_ms:.0f} ms, cached {warm_ms:.1f} ms ({cached_tokens} tokens "
                                     f"from the cache): {cold_ms / warm_ms:.1f}x faster"),
    ]
    print_results(f"engine, {worker.model_name}, fp32 CPU, {PROMPT_TOKENS}-token prompts, {num_tokens} new tokens",
                  rows, figures)


if __name__ == "__main__":
    main()
