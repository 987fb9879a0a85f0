"""Fair-share counters shared by gateway replicas through a real Redis (gateway/fair_counters.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.exceptions

from fareway.inference.v1 import inference_pb2 as pb
from fareway.redis import connect, keys
from gateway.fair_counters import SharedCounterStore
from gateway.fairness import Counters, FairQueue, Share
from tests.gateway.fleet import Client, create_key, gateway, tiny_workers

pytestmark = pytest.mark.redis_cluster

A, B = ("flood", ""), ("quiet", "")


async def first_granted(counters: Counters, meanwhile) -> tuple[str, str]:  # noqa: ANN001 - async () -> None
    """Which of A and B runs first when both wait (B has a little local service as it waits), and
    `meanwhile` happens before a slot frees."""
    room = [0]
    queue = FairQueue(lambda: room[0], counters=counters)
    waits = {t: asyncio.ensure_future(queue.acquire(Share(t))) for t in (A, B)}
    await asyncio.sleep(0)
    counters.add(B, 10)   # e.g. B's earlier request, still streaming here
    await meanwhile()
    room[0] = 1
    queue.dispatch()
    done, _ = await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
    for wait in waits.values():
        wait.cancel()
    return next(t for t, w in waits.items() if w in done)


def test_a_tenant_served_on_another_replica_waits_behind_the_others_here(redis_url) -> None:  # noqa: ANN001
    async def body() -> None:
        clients = [connect(redis_url) for _ in range(2)]
        try:
            async def flood_elsewhere(here) -> None:  # noqa: ANN001
                there = SharedCounterStore(clients[0]).counters("m")
                there.add(A, 1000)      # A is served a lot on the other replica
                await there.sync()
                if here is not None:
                    await here.sync()
            assert await first_granted(Counters(), lambda: flood_elsewhere(None)) == A  # counting alone
            here = SharedCounterStore(clients[1]).counters("m")
            assert await first_granted(here, lambda: flood_elsewhere(here)) == B
            assert here.get(A) - here.get(B) > 900
        finally:
            for client in clients:
                await client.aclose()
    asyncio.run(body())


def test_adds_and_lifts_made_between_syncs_compose_with_the_other_replicas(redis_url) -> None:  # noqa: ANN001
    async def body() -> None:
        one, two = connect(redis_url), connect(redis_url)
        try:
            here, there = SharedCounterStore(one).counters("m"), SharedCounterStore(two).counters("m")
            there.add(A, 40)
            await there.sync()
            here.add(A, 10)
            here.lift(A, 25)        # lifted in this replica's stale view (10 -> 25)...
            here.add(A, 5)
            assert here.get(A) == 30
            await here.sync()       # ...but A had 40 already: max(40 + 10, 25) + 5
            assert here.get(A) == 55
            here.lift(A, 20)        # below it: no change
            await here.sync()
            await there.sync()
            assert here.get(A) == there.get(A) == 55
        finally:
            await one.aclose()
            await two.aclose()
    asyncio.run(body())


def test_what_a_failed_sync_did_not_send_goes_with_the_next(redis_url, redis_client) -> None:  # noqa: ANN001
    async def body() -> None:
        client = connect(redis_url)
        try:
            counters = SharedCounterStore(client).counters("m")
            counters.add(A, 7)
            redis_client.set(keys.fair_counters("m"), "not a hash")   # the script fails
            with pytest.raises(redis.exceptions.ResponseError):
                await counters.sync()
            counters.add(A, 3)
            assert counters.get(A) == 10
            redis_client.delete(keys.fair_counters("m"))
            await counters.sync()
            assert counters.get(A) == 10 and float(redis_client.hget(keys.fair_counters("m"), "flood\x1f")) == 10
        finally:
            await client.aclose()
    asyncio.run(body())


def test_a_running_gateway_shares_the_service_it_gives(background_loop, redis_url, redis_client,  # noqa: ANN001
                                                       tiny_checkpoint) -> None:  # noqa: ANN001
    key = create_key(background_loop, redis_url, "flood")
    with tiny_workers(background_loop, tiny_checkpoint, 1) as workers, \
            gateway(background_loop, redis_url, (workers[0].address,)) as address:
        response = Client(address, key).Generate(pb.GenerateRequest(
            model="tiny-llama", prompt="hello there", sampling=pb.SamplingParams(max_tokens=3, temperature=0)))
        served = response.usage.prompt_tokens + 2 * response.usage.completion_tokens  # default token weights
        deadline = time.monotonic() + 5
        while float(redis_client.hget(keys.fair_counters("tiny-llama"), "flood\x1f") or 0) < served:
            assert time.monotonic() < deadline, redis_client.hgetall(keys.fair_counters("tiny-llama"))
            time.sleep(0.05)
