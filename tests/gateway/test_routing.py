"""Routing policies on synthetic load snapshots, and prefix affinity end to end on two real workers."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest

from fareway.inference.v1 import inference_pb2 as pb
from fareway.redis import keys
from fareway.registry import WorkerLoad
from gateway.routing import POLICIES, Cost, LeastLoad, PrefixAffinity, RoundRobin, Route, Router, route_for
from gateway.shared_homes import SharedHomes
from tests.gateway.fleet import Client, create_key, gateway, tiny_workers


@dataclass
class FakeWorker:
    name: str
    load: WorkerLoad = field(default_factory=WorkerLoad)
    usd_per_device_hour: float | None = 2.0
    device_count: int = 1
    kv_capacity_tokens: int = 0

    @property
    def num_queued(self) -> int:
        return self.load.num_queued


def names(workers) -> list[str]:  # noqa: ANN001
    return [w.name for w in workers]


def test_least_load_prefers_fewest_sequences_then_most_free_kv() -> None:
    workers = [FakeWorker("a", WorkerLoad(num_running=3, kv_tokens_free=9000)),
               FakeWorker("b", WorkerLoad(num_running=1, num_waiting=1, kv_tokens_free=100)),
               FakeWorker("c", WorkerLoad(num_running=2, kv_tokens_free=500))]
    assert names(LeastLoad().order(workers, Route())) == ["c", "b", "a"]


def test_round_robin_rotates() -> None:
    workers = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c")]
    policy = RoundRobin()
    assert [policy.order(workers, Route())[0].name for _ in range(4)] == ["a", "b", "c", "a"]


def test_prefix_affinity_sends_a_prefix_to_one_worker_and_spreads_prefixes() -> None:
    workers = [FakeWorker(f"w{i}") for i in range(4)]
    policy = PrefixAffinity()
    firsts = {policy.order(workers, Route(f"team\0system prompt {i}"))[0].name for i in range(40)}
    assert len(firsts) == 4  # different prefixes land on different workers
    again = {policy.order(list(reversed(workers)), Route("team\0system prompt 7"))[0].name for _ in range(5)}
    assert len(again) == 1  # the same prefix always on one worker, whatever the list order


def test_prefix_affinity_only_moves_the_keys_of_a_worker_that_left() -> None:
    workers = [FakeWorker(f"w{i}") for i in range(4)]
    policy = PrefixAffinity()
    before = {i: policy.order(workers, Route(f"k{i}"))[0].name for i in range(100)}
    after = {i: policy.order(workers[:3], Route(f"k{i}"))[0].name for i in range(100)}
    assert all(after[i] == before[i] for i in before if before[i] != "w3")


def homes_seen_by_two_replicas(client, shared: bool, model: str):  # noqa: ANN001, ANN201
    """Two gateway replicas that first meet 24 prefixes in opposite orders, then route each again:
    the home worker each replica sends each prefix to."""
    workers = [FakeWorker(f"w{i}", kv_capacity_tokens=4000) for i in range(3)]
    routes = [Route(f"team\0system prompt {i}", prefix_tokens=50 + 37 * i) for i in range(24)]
    replicas = [PrefixAffinity(shared=SharedHomes(client, model) if shared else None) for _ in range(2)]

    async def run() -> list[list[str]]:
        for first, second in zip(routes, reversed(routes)):
            replicas[0].order(workers, first)
            replicas[1].order(workers, second)
            for replica in replicas:  # the claims' round trips
                await replica.claims_answered()
        return [[replica.order(workers, route)[0].name for route in routes] for replica in replicas]
    return run()


def test_gateway_replicas_sharing_prefix_homes_send_each_prefix_to_one_worker(with_redis) -> None:  # noqa: ANN001
    model = f"m-{uuid.uuid4().hex[:8]}"
    own_first, own_second = with_redis(lambda client: homes_seen_by_two_replicas(client, False, model))
    assert own_first != own_second  # each replica's own homes: the same prefix on two workers
    shared_first, shared_second = with_redis(lambda client: homes_seen_by_two_replicas(client, True, model))
    assert shared_first == shared_second
    assert len(set(shared_first)) == 3  # still spread over the fleet

    async def held(client) -> dict[str, int]:  # noqa: ANN001
        return {k: int(v) for k, v in (await client.hgetall(keys.prefix_homes(model)[2])).items()}
    assert sum(with_redis(held).values()) == sum(50 + 37 * i for i in range(24))


def test_a_shared_home_whose_worker_left_is_reassigned_once_for_every_replica(with_redis) -> None:  # noqa: ANN001
    model = f"m-{uuid.uuid4().hex[:8]}"
    workers = [FakeWorker(f"w{i}", kv_capacity_tokens=4000) for i in range(3)]
    route = Route("team\0You answer tax questions.", prefix_tokens=120)

    async def body(client) -> tuple[str, str, str]:  # noqa: ANN001
        first, second = (PrefixAffinity(shared=SharedHomes(client, model)) for _ in range(2))
        home = first.order(workers, route)[0].name
        await first.claims_answered()
        second.order(workers, route)  # its own pick, while its claim is on the way
        await second.claims_answered()
        assert second.order(workers, route)[0].name == home
        left = [w for w in workers if w.name != home]
        # Each replica has its own view of which worker is roomiest now: they agree through Redis.
        first._held[left[0].name] = 3000
        second._held[left[1].name] = 3000
        first.order(left, route)
        await first.claims_answered()
        second.order(left, route)
        await second.claims_answered()
        return home, first.order(left, route)[0].name, second.order(left, route)[0].name
    home, first_now, second_now = with_redis(body)
    assert first_now == second_now != home


def test_a_replica_meeting_a_prefix_first_waits_for_its_shared_home(with_redis) -> None:  # noqa: ANN001
    model = f"m-{uuid.uuid4().hex[:8]}"
    workers = [FakeWorker(f"w{i}", kv_capacity_tokens=4000) for i in range(3)]
    route = Route("team\0You answer tax questions.", prefix_tokens=120)

    async def body(client) -> tuple[str, str]:  # noqa: ANN001
        first, second = (PrefixAffinity(shared=SharedHomes(client, model)) for _ in range(2))
        await first.first_claim(workers, route)
        home = first.order(workers, route)[0].name
        assert first.first_claim(workers, route) is None  # known now: nothing to wait for
        second._held[home] = 3000  # its own view would home the prefix elsewhere
        await second.first_claim(workers, route)
        return home, second.order(workers, route)[0].name
    home, second_first_request = with_redis(body)
    assert second_first_request == home


def candidates(workers: list[FakeWorker]) -> list[tuple[str, int]]:
    """Workers as a claim names them: (name, KV capacity)."""
    return [(w.name, w.kv_capacity_tokens) for w in workers]


def test_shared_prefix_homes_forget_the_least_recently_claimed_past_their_bound(with_redis) -> None:  # noqa: ANN001
    model = f"m-{uuid.uuid4().hex[:8]}"
    workers = [FakeWorker(f"w{i}", kv_capacity_tokens=1000) for i in range(2)]

    async def body(client) -> tuple[int, dict[str, str]]:  # noqa: ANN001
        homes = SharedHomes(client, model, max_keys=2)
        for i, tokens in enumerate((100, 200, 300)):
            await homes.claim(f"k{i}", tokens, candidates(workers))
        homes_key, _, held_key = keys.prefix_homes(model)
        return await client.hlen(homes_key), await client.hgetall(held_key)
    num_homes, held = with_redis(body)
    assert num_homes == 2
    assert sum(int(v) for v in held.values()) == 200 + 300


def test_shared_prefix_homes_forget_a_prefix_no_replica_claimed_for_max_idle_s(with_redis) -> None:  # noqa: ANN001
    model = f"m-{uuid.uuid4().hex[:8]}"
    workers = [FakeWorker(f"w{i}", kv_capacity_tokens=1000) for i in range(2)]

    async def body(client) -> tuple[list[str], int]:  # noqa: ANN001
        homes = SharedHomes(client, model, refresh_s=0.1, max_idle_s=0.5)
        await homes.claim("old", 400, candidates(workers))
        await asyncio.sleep(0.7)
        await homes.claim("new", 100, candidates(workers))
        homes_key, _, held_key = keys.prefix_homes(model)
        return list(await client.hkeys(homes_key)), sum(int(v) for v in (await client.hvals(held_key)))
    remaining, held = with_redis(body)
    assert len(remaining) == 1 and held == 100


def test_prefix_affinity_homes_new_prefixes_where_the_caches_have_room() -> None:
    """Prefixes spread evenly (not by the luck of a hash), weighted by KV capacity; a key keeps its
    home, and finds a new one when its home leaves."""
    even = PrefixAffinity()
    workers = [FakeWorker("a"), FakeWorker("b")]
    homes = [even.order(workers, Route(f"t\0prompt {i}", prefix_tokens=100))[0].name for i in range(12)]
    assert sorted(homes.count(n) for n in "ab") == [6, 6]
    big, small = FakeWorker("big", kv_capacity_tokens=3000), FakeWorker("small", kv_capacity_tokens=1000)
    weighted = PrefixAffinity()
    homes = [weighted.order([big, small], Route(f"t\0p{i}", prefix_tokens=100))[0].name for i in range(20)]
    assert (homes.count("big"), homes.count("small")) == (15, 5)
    assert all(weighted.order([small, big], Route(f"t\0p{i}", prefix_tokens=100))[0].name == homes[i]
               for i in range(20))
    moved = [weighted.order([big], Route(f"t\0p{i}", prefix_tokens=100))[0].name for i in range(20)]
    assert moved == ["big"] * 20


def test_prefix_affinity_falls_back_to_least_load_when_its_worker_is_overloaded() -> None:
    workers = [FakeWorker("a"), FakeWorker("b")]
    route = Route("team\0shared")
    home = PrefixAffinity().order(workers, route)[0]
    other = next(w for w in workers if w is not home)
    home.load = WorkerLoad(num_running=4)  # within the margin over the other's 0: stays
    assert PrefixAffinity(overload_margin=4).order(workers, route)[0] is home
    home.load = WorkerLoad(num_running=5, num_waiting=1)
    assert PrefixAffinity(overload_margin=4).order(workers, route)[0] is other


def test_cost_picks_the_cheapest_per_token_within_the_queue_limit() -> None:
    # $4/h at 200 tokens/s is cheaper per token than $1/h at 20 tokens/s.
    fast = FakeWorker("fast", WorkerLoad(tokens_per_s=200.0), usd_per_device_hour=4.0)
    slow = FakeWorker("slow", WorkerLoad(tokens_per_s=20.0), usd_per_device_hour=1.0)
    pair = FakeWorker("pair", WorkerLoad(tokens_per_s=200.0), usd_per_device_hour=4.0, device_count=2)
    unpriced = FakeWorker("unpriced", WorkerLoad(tokens_per_s=1000.0), usd_per_device_hour=None)
    assert names(Cost().order([slow, unpriced, pair, fast], Route())) == ["fast", "pair", "slow", "unpriced"]
    fast.load = WorkerLoad(tokens_per_s=200.0, num_waiting=17)  # over the queue limit: last
    assert names(Cost(max_queued=16).order([slow, pair, fast], Route())) == ["pair", "slow", "fast"]


def test_cost_counts_the_median_throughput_for_a_worker_not_measured_yet() -> None:
    new = FakeWorker("new", WorkerLoad(tokens_per_s=0.0), usd_per_device_hour=1.0)
    measured = FakeWorker("measured", WorkerLoad(tokens_per_s=100.0), usd_per_device_hour=2.0)
    assert names(Cost().order([measured, new], Route())) == ["new", "measured"]


def test_a_session_sticks_to_one_worker_whatever_the_policy() -> None:
    workers = [FakeWorker(f"w{i}", WorkerLoad(num_running=i)) for i in range(3)]
    for policy in POLICIES:
        router = Router(policy)
        chosen = {router.order("m", workers, Route(f"prefix {i}", "session-42"))[0].name for i in range(6)}
        assert len(chosen) == 1, policy


def test_the_router_takes_a_policy_per_model() -> None:
    router = Router("round-robin", {"big": "cost"})
    assert isinstance(router.policy("small"), RoundRobin) and isinstance(router.policy("big"), Cost)
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("fastest")


def test_the_affinity_key_is_the_team_and_the_system_prompt() -> None:
    def chat(system: str, user: str) -> pb.GenerateRequest:
        return pb.GenerateRequest(chat=pb.ChatMessages(messages=[
            pb.ChatMessage(role="system", content=system), pb.ChatMessage(role="user", content=user)]))
    assert route_for(chat("Be brief.", "hi"), "t1") == route_for(chat("Be brief.", "bye"), "t1")
    assert route_for(chat("Be brief.", "hi"), "t1") != route_for(chat("Be brief.", "hi"), "t2")
    assert route_for(pb.GenerateRequest(prompt="x" * 300 + "a"), "t") == \
        route_for(pb.GenerateRequest(prompt="x" * 300 + "b"), "t")
    assert route_for(pb.GenerateRequest(prompt="p", session_id="s"), "t").session_id == "s"


SYSTEM_PROMPT = ("You are the support assistant of a parcel delivery company. Answer in two sentences, "
                 "politely, and never promise a delivery date you cannot check. ") * 3


def ask(client, user: str, session_id: str = "") -> pb.GenerateResponse:  # noqa: ANN001
    return client.Generate(pb.GenerateRequest(
        model="tiny-llama", session_id=session_id, sampling=pb.SamplingParams(max_tokens=2, temperature=0),
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="system", content=SYSTEM_PROMPT),
                                       pb.ChatMessage(role="user", content=user)])))


@pytest.fixture()
def two_workers(background_loop, tiny_checkpoint):  # noqa: ANN001, ANN201
    with tiny_workers(background_loop, tiny_checkpoint, 2) as workers:
        yield tuple(w.address for w in workers)


def test_prefix_affinity_keeps_a_shared_system_prompt_on_one_worker_whose_cache_serves_it(
        background_loop, redis_url, two_workers) -> None:  # noqa: ANN001
    key = create_key(background_loop, redis_url, "team-affinity")
    with gateway(background_loop, redis_url, two_workers, routing="prefix-affinity") as address:
        client = Client(address, key)
        responses = [ask(client, f"Where is parcel number {i}?") for i in range(4)]
    assert len({r.usage.worker_id for r in responses}) == 1
    assert responses[0].usage.cached_tokens == 0
    assert all(r.usage.cached_tokens >= 48 for r in responses[1:])  # the system prompt's blocks


def test_a_home_worker_is_not_counted_busy_for_the_requests_it_has_finished(
        background_loop, redis_url, two_workers) -> None:  # noqa: ANN001
    """A worker's load between its reports counts this gateway's requests still running there, not
    every request sent since the report: one request at a time never looks like an overload, so a
    prefix stays on its home (which had spilled to the other worker from the 6th request)."""
    key = create_key(background_loop, redis_url, "team-home")
    with gateway(background_loop, redis_url, two_workers, routing="prefix-affinity",
                 worker_refresh_interval_s=600.0) as address:  # no load report after the first
        client = Client(address, key)
        responses = [ask(client, f"Where is parcel number {i}?") for i in range(12)]
    assert len({r.usage.worker_id for r in responses}) == 1
    assert all(r.usage.cached_tokens >= 48 for r in responses[1:])


def test_a_workers_estimated_load_is_the_others_as_reported_plus_this_gateways_in_flight() -> None:
    from gateway.pool import WorkerEndpoint

    worker = WorkerEndpoint("10.0.0.5:50052", channel=None, stub=None)  # type: ignore[arg-type]
    worker.num_in_flight = 2
    worker.set_load(WorkerLoad(num_running=4, num_waiting=1))  # 2 of its 5 are this gateway's
    assert worker.num_queued == 5
    worker.num_in_flight = 0  # both ended; the other gateways' 3 stand until the next report
    assert worker.num_queued == 3
    worker.num_in_flight = 4  # a burst sent since the report
    assert worker.num_queued == 7
    worker.set_load(WorkerLoad(num_running=1))  # fewer than this gateway's own: the report is older
    assert worker.num_queued == 4


def test_round_robin_alternates_and_misses_the_cache_half_the_time(
        background_loop, redis_url, two_workers) -> None:  # noqa: ANN001
    key = create_key(background_loop, redis_url, "team-rr")
    with gateway(background_loop, redis_url, two_workers, routing="round-robin") as address:
        client = Client(address, key)
        responses = [ask(client, f"Where is parcel number {i}?") for i in range(4)]
    workers = [r.usage.worker_id for r in responses]
    assert workers[0] != workers[1] and workers[:2] == workers[2:]
    assert responses[1].usage.cached_tokens == 0  # the second worker had not seen the prompt


def test_a_session_stays_on_its_worker(background_loop, redis_url, two_workers) -> None:  # noqa: ANN001
    key = create_key(background_loop, redis_url, "team-session")
    with gateway(background_loop, redis_url, two_workers, routing="round-robin") as address:
        client = Client(address, key)
        for session in ("alice", "bob", "carol"):
            assert len({ask(client, f"turn {i}", session).usage.worker_id for i in range(3)}) == 1
