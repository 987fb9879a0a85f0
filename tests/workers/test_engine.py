"""The engine on a tiny random-weight model: batching, finishing, cancelling,
seeded sampling and GPU-second metering, through the real engine thread."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from workers.config import RunnerConfig, WorkerConfig
from workers.engine.llm_engine import RequestOutput
from workers.engine.scheduler import SchedulerConfig
from workers.engine.sequence import FinishReason, SamplingOptions
from workers.worker import Worker


@pytest.fixture()
def worker(tiny_checkpoint):  # noqa: ANN001, ANN201
    w = Worker(WorkerConfig(worker_id="tiny", runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20),
                            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)), tiny_checkpoint)
    w.start()
    yield w
    w.stop()


def prompt(worker: Worker, text: str) -> list[int]:
    return worker.tokenizer.encode(text)


async def collect(worker: Worker, ids: list[int], options: SamplingOptions) -> list[RequestOutput]:
    return [output async for output in worker.async_engine.generate(ids, options)]


def generate(worker: Worker, ids: list[int], **options) -> list[RequestOutput]:  # noqa: ANN003
    options.setdefault("temperature", 0.0)
    return asyncio.run(collect(worker, ids, SamplingOptions(**options)))


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def text(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_max_tokens_finishes_with_length_and_counts(worker: Worker) -> None:
    ids = prompt(worker, "The quick brown fox")
    outputs = generate(worker, ids, max_tokens=12)
    last = outputs[-1]
    assert last.finish_reason is FinishReason.LENGTH and len(tokens(outputs)) == 12
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ids), 12)
    assert text(outputs) == worker.tokenizer.decode(tokens(outputs))
    assert last.usage.gpu_seconds > 0 and last.usage.total_ms >= last.usage.ttft_ms > 0


def test_a_stop_string_ends_the_text_before_it(worker: Worker) -> None:
    ids = prompt(worker, "Once upon a time")
    full = text(generate(worker, ids, max_tokens=24))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "the random model's text should have something to stop on"
    outputs = generate(worker, ids, max_tokens=24, stop=(stop,))
    assert outputs[-1].finish_reason is FinishReason.STOP_SEQUENCE and outputs[-1].stop_sequence == stop
    assert text(outputs) == full[: full.index(stop)]


def test_end_of_sequence_stops_without_text(worker: Worker) -> None:
    ids = prompt(worker, "Hello")
    first = tokens(generate(worker, ids, max_tokens=1))[0]
    worker.engine.config = dataclasses.replace(worker.engine.config, eos_token_ids=frozenset({first}))
    outputs = generate(worker, ids, max_tokens=8)
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert tokens(outputs) == [first] and text(outputs) == ""


def test_concurrent_requests_give_each_the_tokens_it_gets_alone(worker: Worker) -> None:
    prompts = [prompt(worker, f"Request number {i} says " + "word " * (3 * i)) for i in range(6)]
    alone = [tokens(generate(worker, ids, max_tokens=10)) for ids in prompts]

    async def together() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(worker, ids, SamplingOptions(10, temperature=0)) for ids in prompts))
    assert [tokens(outputs) for outputs in asyncio.run(together())] == alone


def test_seeded_sampling_is_reproducible(worker: Worker) -> None:
    ids = prompt(worker, "Pick a word:")
    draw = lambda seed: tokens(generate(worker, ids, max_tokens=12, temperature=1.0, seed=seed))  # noqa: E731
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    greedy = tokens(generate(worker, ids, max_tokens=12))
    assert tokens(generate(worker, ids, max_tokens=12, temperature=1.0, top_k=1, seed=3)) == greedy


def test_cancelling_frees_the_blocks_at_once(worker: Worker) -> None:
    ids = prompt(worker, "Count forever")

    async def start_then_cancel() -> int:
        stream = worker.async_engine.generate(ids, SamplingOptions(max_tokens=500, temperature=0))
        seen = 0
        async for output in stream:
            seen += len(output.token_ids)
            if seen >= 3:
                break
        await stream.aclose()
        return seen
    assert asyncio.run(start_then_cancel()) >= 3
    deadline = time.monotonic() + 5
    while worker.engine.load().num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    load = worker.engine.load()
    assert (load.num_running, load.num_waiting, load.kv_tokens_used) == (0, 0, 0)


def test_gpu_seconds_add_up_to_wall_time(tiny_checkpoint) -> None:  # noqa: ANN001
    """attributed + idle = wall time x devices (within 1%), and the requests'
    GPU-seconds sum to the attributed total."""
    w = Worker(WorkerConfig(worker_id="meter", runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20)),
               tiny_checkpoint)
    started = time.monotonic()
    w.start()
    prompts = [prompt(w, "a " * (5 + 20 * i)) for i in range(5)]

    async def run() -> list[list[RequestOutput]]:
        await asyncio.sleep(0.3)  # idle first
        return await asyncio.gather(*(collect(w, ids, SamplingOptions(8 + 4 * i, temperature=0))
                                      for i, ids in enumerate(prompts)))
    results = asyncio.run(run())
    time.sleep(0.3)  # idle again
    w.stop()
    elapsed = time.monotonic() - started
    meter = w.engine.meter
    per_request = [outputs[-1].usage.gpu_seconds for outputs in results]
    assert meter.idle_gpu_seconds > 0.3 and all(s > 0 for s in per_request)
    assert meter.total_gpu_seconds == pytest.approx(elapsed * meter.num_devices, rel=0.01)
    assert sum(per_request) == pytest.approx(meter.attributed_gpu_seconds, rel=1e-9)
    # Longer prompts and more tokens do more work, so they are charged more.
    assert per_request[-1] > per_request[0]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3", "int8"])
def test_an_exhausted_pool_preempts_and_every_request_still_gets_its_tokens(tiny_checkpoint,  # noqa: ANN001
                                                                            kv_cache_dtype: str) -> None:
    """Many long requests against a pool far too small for them all: sequences are
    preempted and recomputed (often from their own cached blocks), none is dropped, and
    each output equals the unconstrained run, whatever format the KV cache is stored in."""
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    roomy = Worker(WorkerConfig(worker_id="roomy", scheduler=scheduler,
                                runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20,
                                                    kv_cache_dtype=kv_cache_dtype)), tiny_checkpoint)
    # 12 blocks of 16 tokens: room for about two of these requests at a time.
    cramped = Worker(WorkerConfig(worker_id="cramped", scheduler=scheduler,
                                  runner=RunnerConfig(device="cpu", kv_cache_dtype=kv_cache_dtype,
                                                      kv_cache_memory_bytes=12 * 16 * roomy.runner.kv_bytes_per_token)),
                     tiny_checkpoint)
    assert cramped.runner.num_kv_blocks == 12
    prompts = [prompt(roomy, f"Story {i}: " + "once upon a time " * (2 + i)) for i in range(8)]

    async def all_at_once(worker: Worker) -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(worker, ids, SamplingOptions(60, temperature=0)) for ids in prompts))
    results = {}
    for worker in (roomy, cramped):
        worker.start()
        try:
            results[worker.worker_id] = asyncio.run(all_at_once(worker))
        finally:
            worker.stop()
    assert [tokens(r) for r in results["cramped"]] == [tokens(r) for r in results["roomy"]]
    assert all(len(tokens(r)) == 60 for r in results["cramped"])
    load = cramped.engine.load()
    assert load.num_preemptions > 0 and load.kv_blocks_used == 0
    # Recomputation is charged too, and the books still balance.
    per_request = [r[-1].usage.gpu_seconds for r in results["cramped"]]
    assert sum(per_request) == pytest.approx(cramped.engine.meter.attributed_gpu_seconds, rel=1e-9)


def test_a_prefix_marked_shared_is_reused_across_tenants(tiny_checkpoint) -> None:  # noqa: ANN001
    system = "You are the support assistant of Example Corp. " * 12
    question = "How do I reset my password?"
    shared = Worker(WorkerConfig(worker_id="shared", runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20),
                                 shared_system_prompts=(system,)), tiny_checkpoint)
    private = Worker(WorkerConfig(worker_id="private", runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20)),
                     tiny_checkpoint)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    ids = shared.tokenizer.encode_chat(messages)

    async def cached_tokens(worker: Worker, salt: str) -> int:
        async for output in worker.async_engine.generate(ids, SamplingOptions(2, temperature=0), salt):
            pass
        return output.usage.cached_tokens

    def first_then_other_team(worker: Worker) -> tuple[int, int, int]:
        worker.start()
        try:
            return (asyncio.run(cached_tokens(worker, "team:a")), asyncio.run(cached_tokens(worker, "team:b")),
                    asyncio.run(cached_tokens(worker, "team:a")))
        finally:
            worker.stop()
    block = shared.runner.block_size
    system_tokens = shared.shared_prefixes.match(ids)
    assert system_tokens > 4 * block
    # Unmarked: team b computes everything again; team a reuses all its full blocks.
    assert first_then_other_team(private) == (0, 0, (len(ids) - 1) // block * block)
    # Marked: team b reuses the system prompt's blocks, not team a's question.
    assert first_then_other_team(shared) == (0, system_tokens // block * block, (len(ids) - 1) // block * block)
