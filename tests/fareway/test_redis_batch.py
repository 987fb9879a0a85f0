"""Automatic pipelining (fareway/redis/batch.py) against a real Redis: concurrent calls share a
round trip, and each caller still gets its own reply or error."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
import redis.exceptions

from fareway.net import free_port
from fareway.redis import connect
from fareway.redis.batch import batched_script, batcher_for, close_batcher
from fareway.redis.embedded import EmbeddedRedis

INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAILS = "return redis.error_reply('refused: ' .. ARGV[1])"


@pytest.mark.redis_cluster
def test_calls_made_together_share_one_round_trip_and_keep_their_own_replies(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        script = batched_script(client, INCR_BY)
        await script(keys=["n"], args=[0])  # Redis now holds the script
        batcher = batcher_for(client)
        sent = batcher.num_round_trips
        replies = await asyncio.gather(*(script(keys=["n"], args=[i]) for i in range(1, 11)),
                                       batcher.command("GET", "n"))
        assert batcher.num_round_trips == sent + 1
        assert replies[:10] == [sum(range(1, i + 1)) for i in range(1, 11)]  # in the order they were made
        assert replies[10] == "55"
    with_redis(body)


@pytest.mark.redis_cluster
def test_an_error_reaches_only_its_caller(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        fails, works = batched_script(client, FAILS), batched_script(client, INCR_BY)
        results = await asyncio.gather(works(keys=["n"], args=[2]), fails(keys=["x"], args=["over the limit"]),
                                       works(keys=["n"], args=[3]), return_exceptions=True)
        assert results[0] == 2 and results[2] == 5
        assert isinstance(results[1], redis.exceptions.ResponseError) and "refused: over the limit" in str(results[1])
    with_redis(body)


@pytest.mark.redis_cluster
def test_a_script_redis_forgot_is_loaded_again(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        script = batched_script(client, INCR_BY)
        assert await script(keys=["n"], args=[1]) == 1
        await client.script_flush()
        assert await asyncio.gather(script(keys=["n"], args=[1]), script(keys=["n"], args=[1])) == [2, 3]
        await client.script_flush()
        assert await script(keys=["n"], args=[1]) == 4  # alone, too
    with_redis(body)


@pytest.mark.redis_cluster
def test_a_scripts_first_call_is_not_overtaken_by_a_later_call(with_redis) -> None:  # noqa: ANN001
    """On a Redis that does not hold the script yet, its first call still runs before the calls made after
    it (a request's settlement before the same caller's next admission)."""
    async def body(client) -> None:  # noqa: ANN001
        await client.script_flush()
        close_batcher(client)  # a fresh connection, as after a restart
        batcher = batcher_for(client)
        script = batched_script(client, INCR_BY)
        first = script(keys=["n"], args=[5])
        await asyncio.sleep(0)  # the script's batch goes out; the next call is a batch of its own
        assert await batcher.command("GET", "n") == "5"
        assert await first == 5
        await client.script_flush()  # forgotten while the connection stays open: loaded and run again
        assert await script(keys=["n"], args=[1]) == 6
        assert await asyncio.gather(script(keys=["n"], args=[1]), batcher.command("GET", "n")) == [7, "7"]
    with_redis(body)


@pytest.mark.redis_cluster
def test_calls_keep_their_order_while_the_connection_opens(with_redis) -> None:  # noqa: ANN001
    """A call made while the batcher's connection is still opening, and one made after a pause of about
    the time it takes to open, reach Redis in the order they were made (a request_id's claim, then the
    admission that counts the request only for the claim's owner)."""
    async def body(client) -> None:  # noqa: ANN001
        batcher = batcher_for(client)
        for i in range(200):
            close_batcher(client)  # the next call opens a new connection
            first = batcher.command("SET", f"k{i}", "first")
            for _ in range(i % 5):  # round trips on redis-py's own connection, about as long as the opening
                await client.get("elsewhere")
            second = batcher.command("SET", f"k{i}", "second")
            await asyncio.gather(first, second)
            assert await client.get(f"k{i}") == "second", f"the second call ran first after {i % 5} round trips"
    with_redis(body)


@pytest.mark.redis_cluster
def test_an_unreachable_redis_fails_every_caller_with_a_connection_error(redis_backend: str) -> None:
    scheme = "redis+cluster" if redis_backend == "cluster" else "redis"

    async def body() -> None:
        client = connect(f"{scheme}://127.0.0.1:{free_port()}")
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


@pytest.mark.redis_cluster
def test_a_caller_that_stops_waiting_does_not_disturb_the_others(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        script = batched_script(client, INCR_BY)
        first = asyncio.ensure_future(script(keys=["n"], args=[1]))
        second = asyncio.ensure_future(script(keys=["n"], args=[10]))
        first.cancel()
        assert await second in (10, 11)  # the first may or may not have reached Redis
        assert await script(keys=["n"], args=[0]) == int(await client.get("n"))
    with_redis(body)


def test_a_connection_lost_mid_call_fails_its_callers_and_the_next_call_reconnects(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        batcher = batcher_for(client)
        link_id = await batcher.command("CLIENT", "ID")
        waiting = batcher.command("BLPOP", "never-pushed", 5)  # holds the batcher's connection on the server
        await asyncio.sleep(0.1)
        await client.execute_command("CLIENT", "KILL", "ID", link_id)
        with pytest.raises(redis.exceptions.ConnectionError):
            await asyncio.wait_for(waiting, 2)
        assert await batcher.command("CLIENT", "ID") != link_id
        assert await batched_script(client, INCR_BY)(keys=["n"], args=[7]) == 7
    with_redis(body)


def test_a_reply_slower_than_the_socket_timeout_fails_with_a_timeout(redis_url: str) -> None:
    async def body() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.2)
        try:
            batcher = batcher_for(client)
            with pytest.raises(redis.exceptions.TimeoutError):
                await asyncio.wait_for(batcher.command("BLPOP", "never-pushed", 2), 1.5)
            assert await batcher.command("SET", "after", "1") is True  # a new connection; SET's reply as redis-py's
        finally:
            close_batcher(client)
            await client.aclose()
    asyncio.run(body())


def test_the_batcher_uses_the_clients_user_password_and_database(with_redis, redis_url: str) -> None:  # noqa: ANN001
    async def body(admin) -> None:  # noqa: ANN001
        await admin.execute_command("ACL", "SETUSER", "batcher-test", "on", ">s3cret", "~*", "&*", "+@all")
        host_port = redis_url.removeprefix("redis://")
        client = connect(f"redis://batcher-test:s3cret@{host_port}/3")
        try:
            batcher = batcher_for(client)
            assert await batcher.command("ACL", "WHOAMI") == "batcher-test"
            await batcher.command("SET", "in-db-3", "yes")
        finally:
            await client.aclose()
        assert await admin.get("in-db-3") is None
        db_3 = connect(f"redis://{host_port}/3")
        try:
            assert await db_3.get("in-db-3") == "yes"
        finally:
            await db_3.aclose()
        await admin.execute_command("ACL", "DELUSER", "batcher-test")
    with_redis(body)


def test_a_unix_socket_server_is_reached_the_same_way(tmp_path) -> None:  # noqa: ANN001
    async def body(url: str) -> None:
        client = connect(url)
        try:
            script = batched_script(client, INCR_BY)
            assert await asyncio.gather(script(keys=["n"], args=[1]), script(keys=["n"], args=[2])) == [1, 3]
        finally:
            await client.aclose()
    with EmbeddedRedis(tmp_path / "data", unix_socket=tmp_path / "r.sock") as server:
        asyncio.run(body(server.url))


@pytest.mark.redis_cluster
def test_an_argument_redis_cannot_take_fails_only_its_own_call(with_redis) -> None:  # noqa: ANN001
    async def body(client) -> None:  # noqa: ANN001
        batcher = batcher_for(client)
        results = await asyncio.gather(batcher.command("SET", "a", "1"), batcher.command("SET", "b", None),
                                       batcher.command("GET", "a"), return_exceptions=True)
        assert results[0] is True and results[2] == "1"
        assert isinstance(results[1], redis.exceptions.DataError) and "'SET'" in str(results[1])
    with_redis(body)
