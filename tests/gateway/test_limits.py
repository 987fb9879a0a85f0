"""Rate limits: the admission script against a real Redis with an injected clock
(no double allowance at a window edge, tokens settled to actual use, slots that
lapse), then through real gateways sharing one Redis."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.quota import Limits, LimitsExceeded, LimitStore, RateLimiter
from fareway.redis import connect, keys
from tests.gateway.fleet import gateway
from workers.config import RunnerConfig, WorkerConfig
from workers.server import create_worker_server
from workers.worker import Worker

pytestmark = pytest.mark.redis_cluster

S = 1_000_000  # microseconds per second
T0 = 1_793_491_200 * S


def test_a_bucket_never_passes_its_limit_plus_its_refill_in_any_window(with_redis) -> None:  # noqa: ANN001
    """rpm=60 under random bursts: in every window of w seconds at most 60 + w requests are admitted
    (a fixed window would admit 120 across its edge), and a full minute's burst is admitted at once."""
    rng = random.Random(3)

    async def body(client):  # noqa: ANN001, ANN202
        limiter, limits = RateLimiter(client), [Limits("search", requests_per_minute=60)]
        admitted, now = [], T0
        for i in range(3000):
            now += rng.choice([0, 0, 0, 1000, 50_000, 400_000, 3 * S])
            try:
                await limiter.admit("search", f"r{i}", limits, 1, now_us=now)
                admitted.append(now)
            except LimitsExceeded:
                pass
        return admitted
    admitted = with_redis(body)
    assert len(admitted) > 300
    for i, start in enumerate(admitted):
        for window_s in (0.5, 2, 10, 59.9):
            inside = sum(1 for t in admitted[i:i + 200] if t - start < window_s * S)
            assert inside <= 60 + int(window_s), (window_s, inside)


def test_at_a_minute_edge_only_the_refill_is_admitted(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        limiter, limits = RateLimiter(client), [Limits("search", requests_per_minute=60)]

        async def burst(now: int, tag: str) -> tuple[int, float | None]:
            count, retry = 0, None
            for i in range(200):
                try:
                    await limiter.admit("search", f"{tag}{i}", limits, 1, now_us=now)
                    count += 1
                except LimitsExceeded as refused:
                    retry = refused.exceeded.retry_after_s
            return count, retry
        return await burst(T0 + 59_900_000, "a"), await burst(T0 + 60_100_000, "b"), \
            await burst(T0 + 61_100_000, "c")
    (first, retry), (after_edge, _), (a_second_later, _) = with_redis(body)
    assert first == 60 and retry == pytest.approx(1.0, abs=0.002)
    assert after_edge == 0  # 0.2 s refills a fifth of a request: a fixed window would admit 60 more
    assert a_second_later == 1


def test_tokens_are_settled_to_actual_use(with_redis) -> None:  # noqa: ANN001
    """tpm=100: two requests reserving 60 cannot run together; once the first settles to 10
    tokens, the second fits; an overrun is a debt the next request waits out."""

    async def body(client):  # noqa: ANN001, ANN202
        limiter, limits = RateLimiter(client), [Limits("search", tokens_per_minute=100)]
        first = await limiter.admit("search", "a", limits, 60, now_us=T0)
        with pytest.raises(LimitsExceeded) as refused:
            await limiter.admit("search", "b", limits, 60, now_us=T0)
        await limiter.settle(first, 10, now_us=T0)
        second = await limiter.admit("search", "b", limits, 60, now_us=T0)
        await limiter.settle(second, 90, now_us=T0)  # used more than it reserved
        with pytest.raises(LimitsExceeded) as in_debt:
            await limiter.admit("search", "c", limits, 1, now_us=T0)
        await limiter.admit("search", "c", limits, 1, now_us=T0 + round(0.61 * S))
        return refused.value.exceeded, in_debt.value.exceeded
    refused, in_debt = with_redis(body)
    assert (refused.scope, refused.limit, refused.value) == ("team", "tpm", 100)
    assert refused.retry_after_s == pytest.approx(12.0)  # 20 tokens over, at 100 a minute
    assert in_debt.retry_after_s == pytest.approx(0.6)  # 100 used and 1 wanted: 1 over


def test_a_refusal_holds_nothing_in_any_scope(with_redis) -> None:  # noqa: ANN001
    """The project's limit refuses; the team's buckets and slots it passed are left as they were."""

    async def body(client):  # noqa: ANN001, ANN202
        limiter = RateLimiter(client)
        limits = [Limits("search", requests_per_minute=100, tokens_per_minute=1000, max_concurrent_requests=5),
                  Limits("search", "ranking", max_concurrent_requests=1)]
        held = await limiter.admit("search", "a", limits, 10, now_us=T0)
        before = await client.hgetall(keys.rate("search"))
        with pytest.raises(LimitsExceeded) as refused:
            await limiter.admit("search", "b", limits, 10, now_us=T0)
        after = await client.hgetall(keys.rate("search"))
        team_slots = await client.zrange(keys.inflight("search", "team"), 0, -1)
        await limiter.settle(held, 10, now_us=T0)
        left = await client.zcard(keys.inflight("search", "team")), await client.zcard(
            keys.inflight("search", "project:ranking"))
        return refused.value.exceeded, before == after, team_slots, left
    refused, unchanged, team_slots, left = with_redis(body)
    assert (refused.scope, refused.limit, refused.retry_after_s) == ("project:ranking", "concurrent", 1.0)
    assert unchanged and team_slots == ["a"] and left == (0, 0)


def test_a_dead_gateways_slots_lapse_with_their_lease(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        limiter, limits = RateLimiter(client), [Limits("search", max_concurrent_requests=1)]
        await limiter.admit("search", "orphan", limits, 1, lease_s=30, now_us=T0)  # never settled
        with pytest.raises(LimitsExceeded):
            await limiter.admit("search", "b", limits, 1, now_us=T0 + 29 * S)
        await limiter.admit("search", "b", limits, 1, now_us=T0 + 31 * S)
    with_redis(body)


def test_limits_are_stored_validated_and_cached(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        store = LimitStore(client, cache_ttl_s=60)
        await store.set(Limits("search", requests_per_minute=10))
        await store.set(Limits("search", "ranking", tokens_per_minute=500, max_concurrent_requests=2))
        applied = await store.for_tenant("search", "ranking")
        await store.delete("search")
        cached = await store.for_tenant("search", "ranking")
        return applied, cached, await store.list("search"), await store.teams()
    applied, cached, listed, teams = with_redis(body)
    assert applied == [Limits("search", requests_per_minute=10),
                       Limits("search", "ranking", tokens_per_minute=500, max_concurrent_requests=2)]
    assert cached == applied  # read again only after the cache's lifetime
    assert listed == applied[1:] and teams == ["search"]
    with pytest.raises(ValueError, match="at least one"):
        Limits("search")
    with pytest.raises(ValueError, match="at least 1"):
        Limits("search", requests_per_minute=0)


# Through gateways: the tiny worker, tiny requests.

@pytest.fixture()
def tiny_worker(background_loop, tiny_checkpoint) -> Iterator[str]:  # noqa: ANN001
    worker = Worker(WorkerConfig(worker_id="tiny-worker",
                                 runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=8 << 20)), tiny_checkpoint)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    yield f"127.0.0.1:{server.port}"
    background_loop.run(server.stop(0))
    worker.stop()


def gateway_for(background_loop, redis_url: str, worker: str):  # noqa: ANN001, ANN201 - a context manager
    return gateway(background_loop, redis_url, (worker,))


def call(address: str, key: str, request, stream: bool = False):  # noqa: ANN001, ANN201
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    return (stub.GenerateStream if stream else stub.Generate)(
        request, metadata=(("authorization", f"Bearer {key}"),), timeout=30)


def _set_limits(redis_url: str, background_loop, *limits: Limits) -> None:  # noqa: ANN001
    async def put() -> None:
        client = connect(redis_url)
        try:
            for x in limits:
                await LimitStore(client).set(x)
        finally:
            await client.aclose()
    background_loop.run(put())


def _slots(redis_url: str, team: str) -> int:
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        return client.zcard(keys.inflight(team, "team"))
    finally:
        client.close()


def _one_token(prompt: str = "hi") -> pb.GenerateRequest:
    return pb.GenerateRequest(model="tiny-llama", prompt=prompt, sampling=pb.SamplingParams(max_tokens=1,
                                                                                            temperature=0))


def _outcome(address: str, key: str) -> grpc.StatusCode:
    try:
        call(address, key, _one_token())
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_over_the_rate_is_resource_exhausted_with_quota_failure_and_retry_info(
        stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, requests_per_minute=2))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address:
        call(address, key, _one_token())
        call(address, key, _one_token())
        with pytest.raises(grpc.RpcError) as caught:
            call(address, key, _one_token())
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 2 requests per minute" in caught.value.details()
    status = rpc_status.from_call(caught.value)
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(quota) and status.details[1].Unpack(retry)
    assert quota.violations[0].subject == f"team:{team}"
    assert 25 < retry.retry_delay.ToNanoseconds() / 1e9 <= 30  # a request refills every 30 s
    assert len(stack.records(team)) == 2  # the refused request left no record


def test_two_replicas_share_one_limit_exactly(stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    """rpm=10, 30 requests at once split over two gateways: exactly 10 run."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, requests_per_minute=10))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as first, \
            gateway_for(background_loop, stack.redis_url, tiny_worker) as second:
        with ThreadPoolExecutor(30) as pool:
            outcomes = list(pool.map(lambda i: _outcome((first, second)[i % 2], key), range(30)))
    assert outcomes.count(grpc.StatusCode.OK) == 10
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20


def test_tokens_per_minute_settle_to_what_requests_used(stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    """tpm=60 and requests reserving 28 tokens (a 2-byte prompt's bound of 18, max_tokens=10): a third
    request only fits because the first two were settled to the ~12 tokens they used."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, tokens_per_minute=60))
    request = pb.GenerateRequest(model="tiny-llama", prompt="hi",
                                 sampling=pb.SamplingParams(max_tokens=10, temperature=0))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address:
        responses = [call(address, key, request) for _ in range(3)]
        too_long = pb.GenerateRequest(model="tiny-llama", prompt="hi", sampling=pb.SamplingParams(max_tokens=61))
        with pytest.raises(grpc.RpcError) as never_fits:
            call(address, key, too_long)
    assert never_fits.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "lower max_tokens" in never_fits.value.details()
    assert len(rpc_status.from_call(never_fits.value).details) == 1  # no RetryInfo: waiting cannot help
    used = sum(r.usage.prompt_tokens + r.usage.completion_tokens for r in responses)

    import redis
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        tat_us = float(client.hget(keys.rate(team), "team:tpm"))
        seconds, micros = client.time()
    finally:
        client.close()
    held = max(tat_us - (seconds * S + micros), 0) / S  # one token a second refills
    assert used - 10 <= held <= used


def test_a_concurrency_slot_is_freed_when_a_stream_is_cancelled(stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, max_concurrent_requests=1))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address:
        stream = call(address, key, pb.GenerateStreamRequest(
            model="tiny-llama", prompt="go on", sampling=pb.SamplingParams(max_tokens=500, temperature=0)), True)
        next(stream)
        with pytest.raises(grpc.RpcError) as caught:
            call(address, key, _one_token())
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 concurrent requests" in caught.value.details()
        stream.cancel()
        deadline = time.monotonic() + 10
        while _slots(stack.redis_url, team) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _slots(stack.redis_url, team) == 0
        assert call(address, key, _one_token()).usage.completion_tokens == 1
    assert _slots(stack.redis_url, team) == 0


def test_back_to_back_requests_at_one_concurrent_request_are_never_refused(
        stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    """The slot of an answered request is freed behind its answer (write-behind), yet before Redis sees
    the caller's next request: a caller allowed one request at a time is never refused for its last one."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, max_concurrent_requests=1))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address, \
            grpc.insecure_channel(address) as channel:
        stub, metadata = inference_pb2_grpc.InferenceServiceStub(channel), (("authorization", f"Bearer {key}"),)
        streamed = pb.GenerateStreamRequest(model="tiny-llama", prompt="hi",
                                            sampling=pb.SamplingParams(max_tokens=1, temperature=0))
        for _ in range(20):
            assert stub.Generate(_one_token(), metadata=metadata, timeout=30).usage.completion_tokens == 1
            *_, last = stub.GenerateStream(streamed, metadata=metadata, timeout=30)
            assert last.usage.completion_tokens == 1
    assert _slots(stack.redis_url, team) == 0


def test_a_replayed_request_id_is_served_at_the_limit_and_does_not_count(stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    """The id's claim shares the admission's round trip, and the admission counts only for the claim's
    owner: a replay takes none of the tenant's requests per minute, and a tenant at its limit still gets
    its stored answers."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, requests_per_minute=2, tokens_per_minute=10_000,
                                                         max_concurrent_requests=1))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address:
        ordered = _one_token("order")
        ordered.request_id = "order-1"
        first = call(address, key, ordered)
        for _ in range(5):
            assert call(address, key, ordered) == first
        streamed = pb.GenerateStreamRequest(model="tiny-llama", prompt="order", request_id="order-1",
                                            sampling=pb.SamplingParams(max_tokens=1, temperature=0))
        assert list(call(address, key, streamed, True))[-1].usage == first.usage
        assert call(address, key, _one_token()).usage.completion_tokens == 1  # the minute's second request
        assert _outcome(address, key) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(address, key, ordered) == first  # at the limit, the stored answer still comes back
    assert _slots(stack.redis_url, team) == 0
    assert [r.request_id for r in stack.records(team)].count("order-1") == 1


def test_a_duplicate_of_a_running_request_id_counts_for_nothing(stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    """A duplicate's admission, sent with its claim, is skipped by the scripts: it takes no slot, no place in
    the minute and no budget, and leaves the running request's own slot and reservation alone."""
    from fareway.quota import Budget, Budgets, month_of

    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, requests_per_minute=3, max_concurrent_requests=2))

    async def budgets(action):  # noqa: ANN001, ANN202
        client = connect(stack.redis_url)
        try:
            return await action(Budgets(client))
        finally:
            await client.aclose()
    background_loop.run(budgets(lambda b: b.set(Budget(team, hard_usd=100.0))))
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address:
        running = call(address, key, pb.GenerateStreamRequest(
            model="tiny-llama", prompt="go on", request_id="job-7",
            sampling=pb.SamplingParams(max_tokens=500, temperature=0)), True)
        next(running)
        duplicate = pb.GenerateRequest(model="tiny-llama", prompt="go on", request_id="job-7",
                                       sampling=pb.SamplingParams(max_tokens=500, temperature=0))
        reused = _one_token()  # another request under the same id
        reused.request_id = "job-7"
        for request, code in ((duplicate, grpc.StatusCode.ABORTED), (reused, grpc.StatusCode.INVALID_ARGUMENT)) * 2:
            with pytest.raises(grpc.RpcError) as caught:
                call(address, key, request)
            assert caught.value.code() is code
        assert _slots(stack.redis_url, team) == 1
        # Two more requests pass: the duplicates took no slot and no place in the minute.
        assert call(address, key, _one_token()).usage.completion_tokens == 1
        assert call(address, key, _one_token()).usage.completion_tokens == 1
        running.cancel()
        deadline = time.monotonic() + 10
        while len(stack.records(team)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _slots(stack.redis_url, team) == 0
    spend = background_loop.run(budgets(lambda b: b.spend(team, month_of(time.time()))))
    assert {k: v for k, v in spend.items() if ":reserved_" in k and v} == {}, spend


def test_slots_and_tokens_come_back_when_a_budget_refuses_after_the_limits_admitted(
        stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    from fareway.quota import Budget, Budgets

    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, tokens_per_minute=100, max_concurrent_requests=1))

    async def no_budget() -> None:
        client = connect(stack.redis_url)
        try:
            await Budgets(client).set(Budget(team, hard_usd=0, basis="cost"))
        finally:
            await client.aclose()
    background_loop.run(no_budget())
    with gateway_for(background_loop, stack.redis_url, tiny_worker) as address:
        # Each holds 19 tokens and the one slot until refused: without settlement the sixth
        # would be refused by its limits, not by the budget.
        refusals = []
        for _ in range(8):
            with pytest.raises(grpc.RpcError) as caught:
                call(address, key, _one_token())
            refusals.append(caught.value.details())
    assert all("budget" in r for r in refusals), refusals
    assert _slots(stack.redis_url, team) == 0


def test_a_worker_failing_mid_stream_frees_the_slot(stack, background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    _set_limits(stack.redis_url, background_loop, Limits(team, tokens_per_minute=10_000, max_concurrent_requests=1))
    worker = Worker(WorkerConfig(worker_id="doomed", runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=8 << 20)),
                    tiny_checkpoint)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    try:
        with gateway_for(background_loop, stack.redis_url, f"127.0.0.1:{server.port}") as address:
            stream = call(address, key, pb.GenerateStreamRequest(
                model="tiny-llama", prompt="go on", sampling=pb.SamplingParams(max_tokens=500, temperature=0)), True)
            next(stream)
            assert _slots(stack.redis_url, team) == 1
            background_loop.run(server.stop(0))
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
    finally:
        worker.stop()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _slots(stack.redis_url, team) == 0
