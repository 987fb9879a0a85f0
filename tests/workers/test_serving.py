"""The serving engine on the real SmolLM2: continuous batching and the prefix
cache must never change what a request gets, and cached_tokens must say what
the cache saved."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from workers.engine.llm_engine import RequestOutput
from workers.engine.sequence import SamplingOptions
from workers.worker import Worker

pytestmark = pytest.mark.slow

# Prompts whose greedy continuations differ, so a mix-up between batched sequences shows.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "The three primary colours are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The quick brown fox",
]


def long_prefix(worker: Worker, num_tokens: int = 1000) -> list[int]:
    text = " ".join(f"Rule {n}: every invoice must list its cost centre and its approver." for n in range(120))
    ids = worker.tokenizer.encode(text)
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


async def run(worker: Worker, ids: list[int], max_tokens: int, salt: str) -> RequestOutput:
    """The request's final output, with every generated token gathered into it."""
    tokens: list[int] = []
    async for output in worker.async_engine.generate(ids, SamplingOptions(max_tokens, temperature=0), salt):
        tokens.extend(output.token_ids)
    return RequestOutput(output.request_id, "", tuple(tokens), output.usage, output.finish_reason)


def test_concurrent_requests_get_the_tokens_each_gets_alone(stack) -> None:  # noqa: ANN001
    worker: Worker = stack.worker
    prompts = [worker.tokenizer.encode(p) for p in PROMPTS]
    # A new salt for every request: nothing comes from the prefix cache, so only batching differs.
    alone = [stack.loop.run(run(worker, ids, 24, uuid.uuid4().hex)).token_ids for ids in prompts]

    async def together() -> list[RequestOutput]:
        return await asyncio.gather(*(run(worker, ids, 24, uuid.uuid4().hex) for ids in prompts))
    assert [o.token_ids for o in stack.loop.run(together())] == alone


def test_a_shared_1000_token_prefix_is_served_from_the_cache_with_the_same_output(stack) -> None:  # noqa: ANN001
    worker: Worker = stack.worker
    prefix = long_prefix(worker)
    first = prefix + worker.tokenizer.encode(" Question: who approves an invoice? Answer:")
    second = prefix + worker.tokenizer.encode(" Question: what must an invoice list? Answer:")
    salt = uuid.uuid4().hex
    cold = stack.loop.run(run(worker, second, 16, uuid.uuid4().hex))
    assert cold.usage.cached_tokens == 0

    assert stack.loop.run(run(worker, first, 16, salt)).usage.cached_tokens == 0
    hit = stack.loop.run(run(worker, second, 16, salt))
    assert hit.usage.cached_tokens >= 992
    assert hit.usage.prompt_tokens == len(second)
    assert hit.token_ids == cold.token_ids


def test_a_repeated_conversation_reuses_its_whole_history(stack) -> None:  # noqa: ANN001
    """Multi-turn chat: the next turn's prompt starts with the previous turn and its reply."""
    worker: Worker = stack.worker
    salt = uuid.uuid4().hex
    turn = [{"role": "user", "content": "Name three rivers in Europe and say one thing about each."}]
    first_ids = worker.tokenizer.encode_chat(turn)
    first = stack.loop.run(run(worker, first_ids, 48, salt))
    reply = worker.tokenizer.decode(list(first.token_ids))
    follow_up = turn + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Which is longest?"}]
    second = stack.loop.run(run(worker, worker.tokenizer.encode_chat(follow_up), 8, salt))
    block = worker.runner.block_size
    assert second.usage.cached_tokens >= (len(first_ids) // block) * block


def test_the_load_reports_the_cache(stack) -> None:  # noqa: ANN001
    worker: Worker = stack.worker
    ids = long_prefix(worker, 200)
    salt = uuid.uuid4().hex
    stack.loop.run(run(worker, ids, 2, salt))
    stack.loop.run(run(worker, ids, 2, salt))
    load = worker.engine.load()
    assert load.num_running == load.num_waiting == load.kv_blocks_used == 0
    assert load.kv_blocks_cached >= 200 // worker.runner.block_size
    assert 0 < load.prefix_cache_hit_rate < 1
    assert load.kv_blocks_free == load.kv_blocks_total
