"""Fairness across tenants when workers are saturated: the Virtual Token Counter
queue on its own (requests served one at a time, each charged a fixed number
of tokens), then a real gateway in front of a real tiny worker with two
sequence slots, flooded by one team while another sends a little."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from fareway.auth import Tenant
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import Limits, LimitStore, RateLimiter
from fareway.redis import connect
from gateway.admission import fair_share, limit_hold
from gateway.config import GatewayConfig
from gateway.fairness import FairnessConfig, FairQueue, Share, Slot
from gateway.metrics import GatewayMetrics
from gateway.service import running_gateway
from tests.gateway.fleet import Client, create_key, gateway
from tests.gateway.test_metrics import points
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.scheduler import SchedulerConfig
from workers.server import create_worker_server
from workers.worker import Worker

PROMPT_TOKENS, COMPLETION_TOKENS = 10, 10


def share(team: str, weight: float = 1.0, priority: int = 0) -> Share:
    return Share((team, ""), weight, priority)


class Server:
    """Runs a FairQueue of capacity 1: each granted request is served (charged its tokens) and released."""

    def __init__(self) -> None:
        self.queue = FairQueue(lambda: 1, FairnessConfig(prompt_token_weight=1, completion_token_weight=2))
        self.waiting: list[asyncio.Task[Slot]] = []
        self.served: list[str] = []

    async def submit(self, *shares: Share) -> None:
        for s in shares:
            self.waiting.append(asyncio.create_task(self.queue.acquire(s, PROMPT_TOKENS)))
        await asyncio.sleep(0)

    async def serve(self, count: int) -> list[str]:
        """Serves `count` requests; returns their teams in order."""
        order = []
        for _ in range(count):
            await asyncio.sleep(0)
            granted = [task for task in self.waiting if task.done()]
            assert len(granted) == 1, "capacity 1 grants one request at a time"
            self.waiting.remove(granted[0])
            slot = granted[0].result()
            slot.charge(PROMPT_TOKENS, COMPLETION_TOKENS)
            slot.release()
            order.append(slot.share.tenant[0])
        self.served += order
        return order


def run(body) -> None:  # noqa: ANN001
    asyncio.run(asyncio.wait_for(body(), 10))


def count(teams: Iterable[str], team: str) -> int:
    return sum(1 for t in teams if t == team)


def test_a_flood_does_not_starve_a_tenant_with_little_to_send() -> None:
    """A queues 40 requests, B 2 just after: B is served in turns with A, not after A's 40."""
    async def body() -> None:
        server = Server()
        await server.submit(*[share("a")] * 40)
        await server.submit(*[share("b")] * 2)
        first = await server.serve(5)
        assert count(first, "b") == 2 and first[:4] in (["a", "b", "a", "b"], ["a", "b", "b", "a"])
        assert await server.serve(37) == ["a"] * 37
    run(body)


def test_service_alternates_by_counters() -> None:
    async def body() -> None:
        server = Server()
        await server.submit(*[share("a")] * 10, *[share("b")] * 10)
        order = await server.serve(20)
        assert order[:6] == ["a", "b", "a", "b", "a", "b"]
        counters = server.queue.counters
        assert counters.get(("a", "")) == 10 * (PROMPT_TOKENS + 2 * COMPLETION_TOKENS)
        # B joined when A's first request had been let through (its prompt charged): lifted to A's counter.
        assert counters.get(("b", "")) == counters.get(("a", "")) + PROMPT_TOKENS
    run(body)


def test_a_newly_backlogged_tenant_is_lifted_to_the_smallest_counter() -> None:
    """B is served once, idles while A is served 10 times, then comes back with 10: it gets turns with A,
    not 10 in a row for the time it was idle."""
    async def body() -> None:
        server = Server()
        await server.submit(share("b"))
        await server.serve(1)
        await server.submit(*[share("a")] * 20)
        await server.serve(10)
        assert server.queue.counters.get(("b", "")) < server.queue.counters.get(("a", ""))
        await server.submit(*[share("b")] * 10)
        assert server.queue.counters.get(("b", "")) == server.queue.counters.get(("a", ""))  # lifted
        order = await server.serve(6)
        assert count(order, "b") == 3 and count(order, "a") == 3
    run(body)


def test_weights_divide_service_in_their_ratio() -> None:
    async def body() -> None:
        server = Server()
        await server.submit(*[share("a", weight=2)] * 50, *[share("b", weight=1)] * 50)
        order = await server.serve(30)
        assert count(order, "a") == 20 and count(order, "b") == 10
    run(body)


def test_a_higher_priority_is_served_first_whatever_the_counters() -> None:
    async def body() -> None:
        server = Server()
        await server.submit(*[share("a")] * 10)
        await server.serve(2)
        await server.submit(*[share("urgent", priority=1)] * 3)
        # A's third request was let through as its second finished; nothing running is preempted.
        assert await server.serve(5) == ["a"] + ["urgent"] * 3 + ["a"]
    run(body)


def test_a_cancelled_or_expired_wait_leaves_no_trace() -> None:
    async def body() -> None:
        server = Server()
        await server.submit(share("a"))  # runs
        await server.submit(share("a"), share("b"), share("a"))
        queue = server.queue
        assert queue.num_running == 1 and queue.depth() == {("a", ""): 2, ("b", ""): 1}
        server.waiting[2].cancel()  # b's
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(queue.acquire(share("c")), 0.05)
        await asyncio.sleep(0)
        assert queue.depth() == {("a", ""): 2, ("b", ""): 0, ("c", ""): 0}
        del server.waiting[2]
        assert await server.serve(3) == ["a", "a", "a"]
        assert queue.num_running == 0 and sum(queue.depth().values()) == 0
        # Granted just as the caller went away: the slot goes back.
        running = await queue.acquire(share("a"))
        waiting = asyncio.create_task(queue.acquire(share("a")))
        await asyncio.sleep(0)
        running.release()
        assert waiting.done() is False and queue.num_running == 1  # granted, not yet resumed
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert queue.num_running == 0
    run(body)


def test_a_slot_is_had_at_once_only_with_room_and_nobody_waiting() -> None:
    async def body() -> None:
        capacity = [1]
        queue = FairQueue(lambda: capacity[0], FairnessConfig(prompt_token_weight=1, completion_token_weight=2))
        first = queue.try_acquire(share("a"), 5)
        assert first is not None and queue.num_running == 1
        assert queue.counters.get(("a", "")) == 5  # charged as a granted wait is
        assert queue.try_acquire(share("b")) is None  # no room
        waiting = asyncio.ensure_future(queue.acquire(share("b"), 3))
        await asyncio.sleep(0)
        first.release()
        await waiting
        assert queue.counters.get(("b", "")) == 5 + 3  # lifted to A's counter when it queued, then charged
        queue_full = asyncio.ensure_future(queue.acquire(share("c")))
        await asyncio.sleep(0)
        capacity[0] = 2  # room now, but C was waiting first
        assert queue.try_acquire(share("d")) is None
        queue.dispatch()
        await queue_full
        capacity[0] = 3
        assert queue.try_acquire(share("d")) is not None and queue.num_running == 3
    run(body)


def test_no_known_capacity_means_no_queueing() -> None:
    async def body() -> None:
        queue = FairQueue(lambda: None)
        slots = [await queue.acquire(share("a")) for _ in range(100)]
        assert queue.num_running == 100
        for slot in slots:
            slot.release()
            slot.release()  # once only
        assert queue.num_running == 0
    run(body)


# Through a real gateway in front of a real tiny worker that runs two sequences at once.

@pytest.fixture()
def two_slot_worker(background_loop, tiny_checkpoint) -> Iterator[str]:  # noqa: ANN001
    worker = Worker(WorkerConfig(worker_id="tiny-two-slots", scheduler=SchedulerConfig(max_num_seqs=2),
                                 runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=8 << 20)), tiny_checkpoint)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    yield f"127.0.0.1:{server.port}"
    background_loop.run(server.stop(0))
    worker.stop()


def flood(address: str, heavy_key: str, light_key: str) -> tuple[list[str], list[int]]:
    """40 requests of the heavy team at once, 2 of the light team a moment later: the teams in the order their
    requests finished ("sent" marks when the light team's were sent), and the completion tokens of each."""
    finished: list[str] = []
    lock = threading.Lock()

    def generate(team: str, key: str, i: int) -> int:
        response = Client(address, key).Generate(pb.GenerateRequest(
            model="tiny-llama", prompt=f"{team} request {i} tells a story",
            sampling=pb.SamplingParams(max_tokens=24, temperature=0)))
        with lock:
            finished.append(team)
        return response.usage.completion_tokens
    with ThreadPoolExecutor(42) as pool:
        heavy = [pool.submit(generate, "heavy", heavy_key, i) for i in range(40)]
        time.sleep(0.3)
        with lock:
            finished.append("sent")
        light = [pool.submit(generate, "light", light_key, i) for i in range(2)]
        tokens = [f.result() for f in heavy + light]
    return finished, tokens


def heavy_done(finished: list[str]) -> tuple[int, int]:
    """The heavy team's requests finished before the light team's last one: in all, and after it sent them."""
    last_light = max(i for i, team in enumerate(finished) if team == "light")
    return finished[:last_light].count("heavy"), finished[finished.index("sent"):last_light].count("heavy")


def test_a_tenant_sending_20x_the_load_leaves_the_other_its_share(
        background_loop, redis_url, two_slot_worker) -> None:  # noqa: ANN001
    """Fair: the light team's 2 requests wait for about one round of the 2 sequences the worker runs, and
    finish while most of the heavy team's 40 still wait. Without fairness the worker serves them first come,
    first served: after nearly all of the heavy team's."""
    heavy, light = (create_key(background_loop, redis_url, team) for team in ("heavy", "light"))
    with gateway(background_loop, redis_url, (two_slot_worker,)) as address:
        fair, tokens = flood(address, heavy, light)
    assert sum(tokens) > 42 * 8  # requests long enough for the queue to matter
    in_all, after_sent = heavy_done(fair)
    assert in_all <= 20 and after_sent <= 4, fair
    with gateway(background_loop, redis_url, (two_slot_worker,), fairness=None) as address:
        fifo, _ = flood(address, heavy, light)
    in_all, after_sent = heavy_done(fifo)
    assert in_all >= 30 and after_sent >= 25, fifo


def test_weights_and_priorities_come_from_the_limits(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        store = LimitStore(client, cache_ttl_s=0)
        await store.set(Limits("search", weight=3.0))
        await store.set(Limits("search", "ranking", requests_per_minute=10, priority=2))
        by_team = await fair_share(store, Tenant("search", "ranking", "k"), by_project=False)
        by_project = await fair_share(store, Tenant("search", "ranking", "k"), by_project=True)
        other = await fair_share(store, Tenant("ads", "", "k"), by_project=True)
        hold = await limit_hold(store, RateLimiter(client), Tenant("search", "", "k"), "r1",
                                pb.GenerateRequest(prompt="hi"), 100, None)
        return by_team, by_project, other, hold
    by_team, by_project, other, hold = with_redis(body)
    assert by_team == Share(("search", ""), 3.0, 0)
    assert by_project == Share(("search", "ranking"), 3.0, 2)
    assert other == Share(("ads", ""), 1.0, 0)
    assert not (hold.tokens or hold.slots)  # a weight alone limits nothing


def queue_depth(memory: InMemoryMetricReader) -> dict[str, int]:
    return {p.attributes["fareway.team"]: p.value for p in points(memory)["fareway.queue.depth"]}


def test_a_deadline_passing_in_the_queue_and_cancelled_streams_leave_no_slot_behind(
        background_loop, redis_url, two_slot_worker) -> None:  # noqa: ANN001
    memory = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[memory])
    exits = contextlib.AsyncExitStack()

    async def start() -> int:
        client = connect(redis_url)
        exits.push_async_callback(client.aclose)
        config = GatewayConfig(workers=(two_slot_worker,), listen="127.0.0.1:0", worker_refresh_interval_s=0.2)
        metrics = GatewayMetrics(provider.get_meter("test"))
        return (await exits.enter_async_context(running_gateway(config, client, metrics=metrics))).port
    address = f"127.0.0.1:{background_loop.run(start())}"
    heavy, light = (Client(address, create_key(background_loop, redis_url, team)) for team in ("heavy", "light"))
    long = pb.GenerateStreamRequest(model="tiny-llama", prompt="go on", sampling=pb.SamplingParams(
        max_tokens=900, temperature=0))
    short = pb.GenerateRequest(model="tiny-llama", prompt="hi", sampling=pb.SamplingParams(max_tokens=2))
    try:
        streams = [heavy.GenerateStream(long) for _ in range(2)]
        for stream in streams:
            next(stream)  # both running: the worker's two sequences are taken
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(light.stub.Generate, short, metadata=light.metadata, timeout=1.0)
            time.sleep(0.5)
            assert queue_depth(memory) == {"heavy": 0, "light": 1}
            with pytest.raises(grpc.RpcError) as expired:
                waiting.result()
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # The caller may hear of its deadline a moment before the gateway's own copy of it passes.
        give_up = time.monotonic() + 2.0
        while queue_depth(memory) != {"heavy": 0, "light": 0} and time.monotonic() < give_up:
            time.sleep(0.02)
        assert queue_depth(memory) == {"heavy": 0, "light": 0}
        for stream in streams:
            stream.cancel()
        # Both slots came back: two requests run at once again, well within their deadline.
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(light.stub.Generate, short, metadata=light.metadata, timeout=5.0) for _ in range(2)]
            assert all(f.result().usage.completion_tokens >= 1 for f in done)
    finally:
        background_loop.run(exits.aclose())
        provider.shutdown()


def test_a_request_of_n_samples_takes_n_places() -> None:
    """A request of 3 samples runs 3 sequences: with room for 4, a second one waits until it ends."""
    async def body() -> None:
        queue = FairQueue(lambda: 4)
        three = await queue.acquire(share("a"), 1, width=3)
        assert queue.num_running == 3
        second = asyncio.create_task(queue.acquire(share("b"), 1, width=2))
        await asyncio.sleep(0)
        assert queue.try_acquire(share("c"), 1, width=1) is None  # b waits: nobody overtakes it
        three.release()
        granted = await asyncio.wait_for(second, 1)
        assert queue.num_running == 2 and granted.width == 2
        granted.release()
        assert queue.num_running == 0
    run(body)
