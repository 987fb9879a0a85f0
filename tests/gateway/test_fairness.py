"""Fairness across tenants when workers are saturated: the Virtual Token Counter
queue on its own (requests served one at a time, each charged a fixed number
of tokens), then a real gateway in front of a real tiny worker with two
sequence slots, flooded by one team while another sends a little."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from gateway.fairness import FairnessConfig, FairQueue, Share, Slot

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
        assert counters[("a", "")] == 10 * (PROMPT_TOKENS + 2 * COMPLETION_TOKENS)
        # B joined when A's first request had been let through (its prompt charged): lifted to A's counter.
        assert counters[("b", "")] == counters[("a", "")] + PROMPT_TOKENS
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
        assert server.queue.counters[("b", "")] < server.queue.counters[("a", "")]
        await server.submit(*[share("b")] * 10)
        assert server.queue.counters[("b", "")] == server.queue.counters[("a", "")]  # lifted
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
