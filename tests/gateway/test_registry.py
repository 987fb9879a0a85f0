"""Workers register in Redis and heartbeat; gateways watch the registry."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid

import grpc
import pytest

from fareway.inference.v1 import inference_pb2 as pb
from fareway.redis import connect, keys
from fareway.registry import WorkerLoad, WorkerRegistration, WorkerRegistry
from fareway.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.gateway.fleet import Client, create_key, gateway, tiny_workers
from workers.serving import in_the_fleet

pytestmark = pytest.mark.redis_cluster


def wait_for(condition, timeout_s: float = 10.0) -> float:  # noqa: ANN001
    """Seconds until `condition()` held (fails the test after timeout_s)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - started


def num_workers(client: Client) -> int:
    models = client.ListModels(pb.ListModelsRequest()).models
    return sum(m.num_workers for m in models)


def test_a_registration_lives_as_long_as_its_heartbeats(with_redis) -> None:  # noqa: ANN001
    registration = WorkerRegistration("w1", "10.0.0.5:50052", "m", "nvidia-h100", 2, 2, 50_000, 4.5)
    load = WorkerLoad(num_running=3, num_waiting=1, kv_tokens_free=1200, tokens_per_s=87.5,
                      prefix_cache_hit_rate=0.25)

    async def body(client) -> None:  # noqa: ANN001
        registry = WorkerRegistry(client, ttl_s=0.5)
        await registry.heartbeat(registration, load)
        [found] = await registry.workers()
        assert (found.registration, found.load) == (registration, load)
        await asyncio.sleep(0.7)  # no heartbeat for longer than the TTL
        assert await registry.workers() == []
        await registry.heartbeat(registration, load)
        await registry.deregister("w1")
        assert await registry.workers() == [] and await client.zcard(keys.REGISTERED_WORKERS) == 0
    with_redis(body)


def test_a_registered_worker_joins_a_gateways_pool_and_leaves_when_its_heartbeat_stops(
        background_loop, redis_url, tiny_checkpoint) -> None:  # noqa: ANN001
    key = create_key(background_loop, redis_url, f"t-{uuid.uuid4().hex[:6]}")
    with gateway(background_loop, redis_url, registry=True) as address:
        client = Client(address, key)
        assert num_workers(client) == 0
        with tiny_workers(background_loop, tiny_checkpoint, 2, redis_url, ttl_s=1.0) as workers:
            wait_for(lambda: num_workers(client) == 2)
            response = client.Generate(pb.GenerateRequest(
                model="tiny-llama", prompt="hello", sampling=pb.SamplingParams(max_tokens=8, temperature=0)))
            assert response.usage.worker_id in {"tiny-0", "tiny-1"}
            background_loop.run(workers[0].heartbeat.pause())  # as if the worker hung or lost its network
            gone_after_s = wait_for(lambda: num_workers(client) == 1)
            assert gone_after_s < 3.0
            for _ in range(3):  # every request goes to the worker still registered
                response = client.Generate(pb.GenerateRequest(
                    model="tiny-llama", prompt="hello", sampling=pb.SamplingParams(max_tokens=2)))
                assert response.usage.worker_id == "tiny-1"


def test_a_worker_publishes_its_measured_throughput(background_loop, redis_url, tiny_checkpoint) -> None:  # noqa: ANN001
    with tiny_workers(background_loop, tiny_checkpoint, 1, redis_url) as [tiny]:
        stub = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(tiny.address))
        list(stub.Generate(worker_pb2.GenerateRequest(
            model="tiny-llama", prompt="count", sampling=pb.SamplingParams(max_tokens=20, temperature=0)),
            timeout=30))

        def load() -> WorkerLoad:
            [entry] = background_loop.run(tiny.heartbeat.registry.workers())
            return entry.load
        wait_for(lambda: load().tokens_per_s > 0)
        assert tiny.heartbeat.registration.kv_capacity_tokens > 0


def test_shutdown_leaves_the_registry_first_then_finishes_in_flight_requests(
        background_loop, redis_url, tiny_checkpoint) -> None:  # noqa: ANN001
    redis = connect(redis_url)
    registry = WorkerRegistry(redis)
    with tiny_workers(background_loop, tiny_checkpoint, 1) as [tiny]:
        fleet = contextlib.AsyncExitStack()
        background_loop.run(fleet.enter_async_context(
            in_the_fleet(tiny.worker, tiny.server, redis_url, tiny.address, drain_timeout_s=30.0)))
        wait_for(lambda: [w.registration.address for w in background_loop.run(registry.workers())] == [tiny.address])
        stub = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(tiny.address))
        stream = stub.Generate(worker_pb2.GenerateRequest(
            model="tiny-llama", prompt="go on", sampling=pb.SamplingParams(max_tokens=300, temperature=0)),
            timeout=60)
        received = [next(stream), next(stream)]  # admitted, generating
        shutdown = threading.Thread(target=background_loop.run, args=(fleet.aclose(),))
        shutdown.start()
        wait_for(lambda: background_loop.run(registry.workers()) == [])
        assert shutdown.is_alive()  # deregistered while the request still runs
        received.extend(stream)  # the in-flight request runs to its end
        shutdown.join(timeout=30)
    background_loop.run(redis.aclose())
    assert received[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert sum(len(m.token_ids) for m in received) == received[-1].usage.completion_tokens


def test_a_configured_worker_that_also_registers_is_one_worker_with_its_published_load(
        background_loop, redis_url, tiny_checkpoint) -> None:  # noqa: ANN001
    key = create_key(background_loop, redis_url, f"t-{uuid.uuid4().hex[:6]}")
    with tiny_workers(background_loop, tiny_checkpoint, 2, redis_url) as workers:
        with gateway(background_loop, redis_url, (workers[0].address,), registry=True) as address:
            client = Client(address, key)
            wait_for(lambda: num_workers(client) == 2)
            time.sleep(0.5)  # a few more registry polls: still two, not three
            assert num_workers(client) == 2


def test_gateway_replicas_count_each_other_to_share_the_fleet(with_redis) -> None:  # noqa: ANN001
    """Each gateway queues for its share of a model's sequence slots: it counts the live replicas
    serving that model."""
    from fareway.registry import GatewayPeers

    async def body(client) -> None:  # noqa: ANN001
        first, second = GatewayPeers(client, "g1", ttl_s=0.5), GatewayPeers(client, "g2", ttl_s=0.5)
        assert first.count("m") == 1 and await first.beat(["m", "other"]) == {"m": 1, "other": 1}
        assert await second.beat(["m"]) == {"m": 2} and await first.beat(["m", "other"]) == {"m": 2, "other": 1}
        await second.leave()
        assert (await first.beat(["m"]))["m"] == 1
        await second.beat(["m"])
        await asyncio.sleep(0.7)            # g2 stops beating: it lapses
        assert await first.beat(["m"]) == {"m": 1} and first.count("m") == 1
    with_redis(body)


def test_running_gateways_register_as_peers_of_their_model(background_loop, redis_url, redis_client,  # noqa: ANN001
                                                           tiny_checkpoint) -> None:  # noqa: ANN001
    client = redis_client
    peers = keys.gateways("tiny-llama")
    with tiny_workers(background_loop, tiny_checkpoint, 1) as workers:
        address = (workers[0].address,)
        with gateway(background_loop, redis_url, address), gateway(background_loop, redis_url, address):
            deadline = time.monotonic() + 5
            while client.zcard(peers) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert client.zcard(peers) == 0   # both left as they stopped


def test_the_worker_refreshes_outlive_a_failed_round_and_a_channel_closed_under_them(
        background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    """A refresh round that fails (here its health callback) is logged and the next round runs; a
    worker whose channel was closed while a round read it (it left the registry meanwhile) counts
    as down, instead of ending the refreshes for good."""
    from gateway.pool import WorkerPool
    from tests.gateway.test_failover import serving_worker

    with serving_worker(background_loop, tiny_checkpoint, "w") as (address, _, _):
        rounds: list[bool] = []

        async def on_refresh(serving: bool) -> None:
            rounds.append(serving)
            if len(rounds) == 2:
                raise RuntimeError("a health callback failing once")

        async def body() -> tuple[list[bool], bool]:
            pool = WorkerPool((address,), refresh_interval_s=0.05, on_refresh=on_refresh)
            await pool.start()
            try:
                while len(rounds) < 4:
                    await asyncio.sleep(0.02)
                [endpoint] = pool.endpoints
                await endpoint.channel.close()
                await pool.refresh()  # reads the closed channel: no UsageError out of it
                return list(rounds), endpoint.is_up
            finally:
                await pool.close()
        seen, is_up = background_loop.run(body())
    assert seen[:4] == [True] * 4 and not is_up
