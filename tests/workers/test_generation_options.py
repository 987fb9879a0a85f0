"""min_tokens, stop_token_ids, ignore_eos, logprobs, prompt_logprobs and n parallel samples, through the
real engine thread on a tiny random-weight model (the real model's logprobs: tests/workers/test_model.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from tests.workers.test_engine import collect, generate, prompt, text, tokens
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.llm_engine import EngineRequest, RequestOutput
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


@pytest.fixture()
def fp32_worker(tiny_checkpoint):  # noqa: ANN001, ANN201
    """fp32 weights: int8's per-token activation rounding turns the last bits the two attention paths
    (a decode step's, a whole text's) differ by into differences of ~1e-4 of a value."""
    w = Worker(WorkerConfig(worker_id="tiny-fp32", runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20,
                                                                       weights="fp32"),
                            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)), tiny_checkpoint)
    w.start()
    yield w
    w.stop()


def by_index(outputs: list[RequestOutput]) -> dict[int, list[RequestOutput]]:
    samples: dict[int, list[RequestOutput]] = {}
    for output in outputs:
        samples.setdefault(output.index, []).append(output)
    return samples


def test_a_stop_token_ends_generation_with_its_id_and_without_its_text(worker: Worker) -> None:
    ids = prompt(worker, "The quick brown fox")
    free = tokens(generate(worker, ids, max_tokens=8))
    stop = free[3]
    first = free.index(stop)
    outputs = generate(worker, ids, max_tokens=8, stop_token_ids=(stop,))
    assert tokens(outputs) == free[:first + 1]
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert text(outputs) == worker.tokenizer.decode(free[:first])


def test_min_tokens_bars_stop_tokens_and_eos_until_reached(worker: Worker) -> None:
    ids = prompt(worker, "The quick brown fox")
    eos = worker.tokenizer.eos_token_id
    # The bias makes end-of-sequence the likeliest token at every step.
    forced = generate(worker, ids, max_tokens=8, logit_bias=((eos, 100.0),))
    assert tokens(forced) == [eos] and forced[-1].finish_reason is FinishReason.STOP
    held = generate(worker, ids, max_tokens=8, logit_bias=((eos, 100.0),), min_tokens=5)
    assert len(tokens(held)) == 6 and eos not in tokens(held)[:5] and tokens(held)[5] == eos
    assert held[-1].finish_reason is FinishReason.STOP
    stop = tokens(generate(worker, ids, max_tokens=1))[0]
    barred = generate(worker, ids, max_tokens=6, stop_token_ids=(stop,), min_tokens=6)
    assert stop not in tokens(barred) and len(tokens(barred)) == 6


def test_ignore_eos_keeps_generating_to_max_tokens(worker: Worker) -> None:
    ids = prompt(worker, "The quick brown fox")
    eos = worker.tokenizer.eos_token_id
    outputs = generate(worker, ids, max_tokens=4, logit_bias=((eos, 100.0),), ignore_eos=True)
    assert tokens(outputs) == [eos] * 4 and outputs[-1].finish_reason is FinishReason.LENGTH


def test_logprobs_are_the_models_log_softmax_at_each_generated_token(fp32_worker: Worker) -> None:
    worker = fp32_worker
    ids = prompt(worker, "The quick brown fox")
    outputs = generate(worker, ids, max_tokens=6, temperature=1.0, seed=3, logprobs=4)
    generated = tokens(outputs)
    positions = [p for o in outputs for p in o.logprobs]
    assert [p.token_id for p in positions] == generated
    # The reference: the same tokens scored through the model in one pass.
    reference = worker.runner.prompt_logprobs(ids + generated)[len(ids) - 1:]
    assert [p.logprob for p in positions] == pytest.approx(reference.tolist(), abs=1e-4)
    for p in positions:
        assert len(p.top) == 4
        assert [v for _, v in p.top] == sorted((v for _, v in p.top), reverse=True)
        assert p.rank >= 1 and (p.rank > 4 or p.top[p.rank - 1][0] == p.token_id)
    greedy = generate(worker, ids, max_tokens=3, logprobs=0)
    assert all(p.rank == 1 and p.top == () for o in greedy for p in o.logprobs)
    assert all(o.logprobs == () for o in generate(worker, ids, max_tokens=3))


def test_prompt_logprobs_cover_the_prompt_even_when_it_is_cached(worker: Worker) -> None:
    ids = prompt(worker, "Paged attention keeps KV blocks. " * 6)
    assert len(ids) > 2 * worker.runner.block_size
    reference = worker.runner.prompt_logprobs(ids).tolist()
    generate(worker, ids, max_tokens=1)  # its blocks are now in the prefix cache
    outputs = generate(worker, ids, max_tokens=2, prompt_logprobs=2)
    assert outputs[0].usage.cached_tokens == 0  # it computed its whole prompt
    got = [p for o in outputs for p in o.prompt_logprobs]
    assert [p.token_id for p in got] == ids[1:]
    assert [p.logprob for p in got] == pytest.approx(reference, abs=1e-4)
    assert all(len(p.top) == 2 for p in got)


def test_n_samples_are_reproducible_distinct_and_counted_together(worker: Worker) -> None:
    ids = prompt(worker, "Once upon a time")
    runs = [by_index(generate(worker, ids, max_tokens=10, temperature=1.0, seed=7, n=3)) for _ in range(2)]
    assert sorted(runs[0]) == [0, 1, 2]
    samples = [tokens(runs[0][i]) for i in range(3)]
    assert samples == [tokens(runs[1][i]) for i in range(3)]
    assert len({tuple(s) for s in samples}) == 3
    # Sample 0 is what the request alone would give: the same seed, the same generator.
    assert samples[0] == tokens(generate(worker, ids, max_tokens=10, temperature=1.0, seed=7))
    outputs = [o for run in runs[:1] for sample in run.values() for o in sample]
    last = [o for o in outputs if o.done]
    assert len(last) == 1 and last[0].usage.completion_tokens == 30 and last[0].usage.prompt_tokens == len(ids)
    assert all(o.finish_reason is FinishReason.LENGTH for o in outputs if o.finished)
    assert worker.engine.load().kv_blocks_used == 0


@pytest.mark.parametrize("extra", [5, 16], ids=["partial-last-block", "full-blocks"])
def test_samples_share_the_prompts_blocks(worker: Worker, extra: int) -> None:
    """At the fork, the n samples hold the prompt's full blocks once, and each its own copy of a
    partial last block: n requests would hold n of each."""
    block = worker.runner.block_size
    ids = prompt(worker, "A shared prompt for every sample. " * 8)[: 2 * block + extra % block]
    full, partial = divmod(len(ids), block)
    used_at_fork: list[int] = []
    done = threading.Event()

    def sink(output: RequestOutput) -> None:  # on the engine thread, between steps
        if not used_at_fork:
            used_at_fork.append(worker.engine.block_manager.num_used_blocks)
        if output.done:
            done.set()
    worker.engine.submit(EngineRequest("shared", ids, SamplingOptions(4, temperature=1.0, seed=1, n=4), sink))
    assert done.wait(30)
    assert used_at_fork == [full + (4 if partial else 0)]
    assert worker.engine.load().kv_blocks_used == 0


def test_samples_equal_under_preemption(tiny_checkpoint) -> None:  # noqa: ANN001
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    roomy = Worker(WorkerConfig(worker_id="roomy", scheduler=scheduler,
                                runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20)), tiny_checkpoint)
    cramped = Worker(WorkerConfig(worker_id="cramped", scheduler=scheduler, runner=RunnerConfig(
        device="cpu", kv_cache_memory_bytes=12 * 16 * roomy.runner.kv_bytes_per_token)), tiny_checkpoint)
    prompts = [prompt(roomy, f"Story {i}: " + "once upon a time " * (2 + i)) for i in range(3)]

    async def all_at_once(worker: Worker) -> list[dict[int, list[int]]]:
        runs = await asyncio.gather(*(collect(worker, ids, SamplingOptions(40, temperature=1.0, seed=i, n=2))
                                      for i, ids in enumerate(prompts)))
        return [{i: tokens(outputs) for i, outputs in by_index(run).items()} for run in runs]
    results = {}
    for w in (roomy, cramped):
        w.start()
        try:
            results[w.worker_id] = asyncio.run(all_at_once(w))
        finally:
            w.stop()
    assert results["cramped"] == results["roomy"]
    assert cramped.engine.load().num_preemptions > 0 and cramped.engine.load().kv_blocks_used == 0


def test_cancelling_a_request_of_n_samples_frees_every_block(worker: Worker) -> None:
    ids = prompt(worker, "Once upon a time")

    async def cancel_after_some() -> list[RequestOutput]:
        seen = []
        async for output in worker.async_engine.generate(ids, SamplingOptions(200, temperature=1.0, n=3)):
            seen.append(output)
            if len(seen) == 6:
                break
        return seen
    assert len(asyncio.run(cancel_after_some())) == 6
    for _ in range(100):
        if worker.engine.load().kv_blocks_used == 0 and worker.engine.load().num_running == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert worker.engine.load().kv_blocks_used == 0


def test_logprobs_of_tied_rows_are_batched_like_single_rows() -> None:
    from workers.sampling import logprobs_of
    logits = torch.randn(3, 50)
    chosen = torch.tensor([4, 9, 0])
    together = logprobs_of(logits, chosen, [2, 0, 5])
    alone = [logprobs_of(logits[i:i + 1], chosen[i:i + 1], [k])[0] for i, k in enumerate([2, 0, 5])]
    assert together == alone
    lp = torch.log_softmax(logits, -1)
    assert together[2].logprob == pytest.approx(lp[2, 0].item())
    assert together[2].rank == int((lp[2] > lp[2, 0]).sum()) + 1
