"""Automatic pipelining (fareway/redis_batch.py) against a real Redis: concurrent calls share a
round trip, and each caller still gets its own reply or error."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions

from fareway.redis_batch import batched_script, batcher_for
from fareway.redis_store import connect, free_port

INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAILS = "return redis.error_reply('refused: ' .. ARGV[1])"


def count_pipelines(client) -> list[int]:  # noqa: ANN001
    """Counts the pipelines the client opens (each is one round trip)."""
    opened = [0]
    pipeline = client.pipeline

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        opened[0] += 1
        return pipeline(*args, **kwargs)
    client.pipeline = counting
    return opened


def test_calls_made_together_share_one_round_trip_and_keep_their_own_replies(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        script = batched_script(client, INCR_BY)
        await script(keys=["n"], args=[0])  # Redis now holds the script
        opened = count_pipelines(client)
        replies = await asyncio.gather(*(script(keys=["n"], args=[i]) for i in range(1, 11)),
                                       batcher_for(client).command("GET", "n"))
        assert opened[0] == 1
        assert replies[:10] == [sum(range(1, i + 1)) for i in range(1, 11)]  # in the order they were made
        assert replies[10] == "55"
    with_redis(body)


def test_an_error_reaches_only_its_caller(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        fails, works = batched_script(client, FAILS), batched_script(client, INCR_BY)
        results = await asyncio.gather(works(keys=["n"], args=[2]), fails(keys=["x"], args=["over the limit"]),
                                       works(keys=["n"], args=[3]), return_exceptions=True)
        assert results[0] == 2 and results[2] == 5
        assert isinstance(results[1], redis.exceptions.ResponseError) and "refused: over the limit" in str(results[1])
    with_redis(body)


def test_a_script_redis_forgot_is_loaded_again(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        script = batched_script(client, INCR_BY)
        assert await script(keys=["n"], args=[1]) == 1
        await client.script_flush()
        assert await asyncio.gather(script(keys=["n"], args=[1]), script(keys=["n"], args=[1])) == [2, 3]
        await client.script_flush()
        assert await script(keys=["n"], args=[1]) == 4  # alone, too
    with_redis(body)


def test_an_unreachable_redis_fails_every_caller_with_a_connection_error() -> None:
    async def body() -> None:
        client = connect(f"redis://127.0.0.1:{free_port()}")
        script = batched_script(client, INCR_BY)
        try:
            results = await asyncio.gather(script(keys=["n"], args=[1]), script(keys=["n"], args=[2]),
                                           return_exceptions=True)
            assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results
            with pytest.raises(redis.exceptions.ConnectionError):
                await script(keys=["n"], args=[1])
        finally:
            await client.aclose()
    asyncio.run(body())


def test_a_caller_that_stops_waiting_does_not_disturb_the_others(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        script = batched_script(client, INCR_BY)
        first = asyncio.ensure_future(script(keys=["n"], args=[1]))
        second = asyncio.ensure_future(script(keys=["n"], args=[10]))
        first.cancel()
        assert await second in (10, 11)  # the first may or may not have reached Redis
        assert await script(keys=["n"], args=[0]) == int(await client.get("n"))
    with_redis(body)
