"""Redis Cluster: every Lua script call and every transaction touches the keys of one hash slot (a
cluster refuses anything else with CROSSSLOT), checked three ways: each call site, found in the source,
is run with sample inputs and its keys' slots compared; the same workload runs on a real 3-master
cluster; and a gateway serves, limits, budgets and records requests through the cluster."""

from __future__ import annotations

import ast
import asyncio
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio.client
from redis.cluster import key_slot

from accounting.capacity import CapacityStore, WorkerInfo
from accounting.ledger import Ledger
from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook, price_record
from accounting.pricebook_store import PriceBookStore
from accounting.records import UsageRecord
from accounting.reports import usage_report
from fareway.auth import KeyStore, Role, Tenant
from fareway.errors import Unauthenticated
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import Budget, Budgets, Limits, LimitStore, RateLimiter, month_of
from fareway.redis import connect, keys
from fareway.redis.batch import BatchedScript
from fareway.registry import GatewayPeers, WorkerLoad, WorkerRegistration, WorkerRegistry
from gateway.fair_counters import SharedCounterStore
from gateway.idempotency import IdempotencyStore, Outcome
from gateway.shared_homes import SharedHomes
from tests.gateway.fleet import Client, create_key, gateway, tiny_workers

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fareway", "gateway", "accounting", "workers", "cli")
LUA = ROOT / "fareway" / "redis" / "lua"
MULTI_KEY_COMMANDS = {
    "mget", "mset", "msetnx", "sunion", "sunionstore", "sinter", "sinterstore", "sintercard", "sdiff",
    "sdiffstore", "smove", "rename", "renamenx", "copy", "lmove", "blmove", "rpoplpush", "brpoplpush",
    "lmpop", "blmpop", "zmpop", "bzmpop", "zunion", "zunionstore", "zinter", "zinterstore", "zintercard",
    "zdiff", "zdiffstore", "zrangestore", "bitop", "pfmerge", "xread", "xreadgroup", "eval", "evalsha",
    "fcall", "register_script"}
"""Commands that name several keys and that redis-py's cluster client does not split by slot (it
splits DEL, EXISTS, TOUCH and UNLINK, and pipelines without a transaction): in Fareway's code they
could only ever meet keys of one slot by chance. Scripts go through fareway/redis/batch.py's
batched_script (whose calls the recorder below sees), never EVAL or register_script directly."""
_REDIS_RECEIVER = re.compile(r"(redis|pipe|client|batcher|batcher_for\(.*\))$")


def _trees() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" not in path.name:
                yield str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8"))


def _calls_by_function(tree: ast.Module) -> Iterator[tuple[str, ast.Call]]:
    """Each call in the module, with the name of the function it is in (innermost)."""
    def visit(node: ast.AST, function: str) -> Iterator[tuple[str, ast.Call]]:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                yield function, child
            yield from visit(child, name)
    yield from visit(tree, "<module>")


def transaction_sites() -> set[str]:
    """"path::function" of every `pipeline(transaction=True)` (MULTI/EXEC) in the packages."""
    return {f"{path}::{function}" for path, tree in _trees() for function, call in _calls_by_function(tree)
            if isinstance(call.func, ast.Attribute) and call.func.attr == "pipeline"
            and any(k.arg == "transaction" and getattr(k.value, "value", None) is True for k in call.keywords)}


def multi_key_calls() -> list[str]:
    """Calls on a Redis client, pipeline or batcher of a command in MULTI_KEY_COMMANDS, by method or by name."""
    found = []
    for path, tree in _trees():
        if path.startswith("fareway/redis/"):
            continue  # the client itself: it sends what its callers give it
        for function, call in _calls_by_function(tree):
            if not isinstance(call.func, ast.Attribute) or not _REDIS_RECEIVER.search(ast.unparse(call.func.value)):
                continue
            name = call.func.attr
            if name in ("command", "execute_command") and call.args and isinstance(call.args[0], ast.Constant):
                name = str(call.args[0].value).split()[0].lower()
            if name in MULTI_KEY_COMMANDS:
                found.append(f"{path}::{function}: {ast.unparse(call)}")
    return found


def _site() -> str:
    """"path::function" of the innermost frame in the packages that led here."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES \
                and path.relative_to(ROOT).parts[:2] != ("fareway", "redis"):
            return f"{path.relative_to(ROOT)}::{frame.f_code.co_name}"
        frame = frame.f_back
    return "<outside the packages>"


@dataclass
class Touch:
    kind: str
    """"script <lua files>" or "transaction"."""
    site: str
    keys: list[str]

    @property
    def slots(self) -> set[int]:
        return {key_slot(key.encode()) for key in self.keys}


@dataclass
class Recorder:
    """Every script call and transaction made while it records, with the keys it touches."""

    server: redis.Redis
    """Asked which arguments of a command are keys (COMMAND GETKEYS)."""
    touches: list[Touch] = field(default_factory=list)

    @contextmanager
    def recording(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
        # Each file's first line (a comment saying what it does) names it in a script's source.
        lua_files = {path.stem: path.read_text(encoding="utf-8").splitlines()[0] for path in LUA.glob("*.lua")}
        call, execute, watch = BatchedScript.__call__, redis.asyncio.client.Pipeline.execute, \
            redis.asyncio.client.Pipeline.watch
        recorder = self

        def script_call(script: BatchedScript, keys: Any = (), args: Any = (), client: Any = None) -> Any:
            names = sorted(name for name, text in lua_files.items() if text in script.script.script)
            recorder.touches.append(Touch(f"script {'+'.join(names)}", _site(), [str(k) for k in keys]))
            return call(script, keys, args, client)

        async def pipeline_watch(pipe: Any, *names: Any) -> Any:
            pipe.fw_watched = [*getattr(pipe, "fw_watched", []), *names]
            return await watch(pipe, *names)

        async def pipeline_execute(pipe: Any, raise_on_error: bool = True) -> Any:
            if pipe.is_transaction:
                touched = list(getattr(pipe, "fw_watched", []))
                for args, _ in pipe.command_stack:
                    touched += recorder.server.execute_command("COMMAND GETKEYS", *args)
                recorder.touches.append(Touch("transaction", _site(), [str(k) for k in touched]))
            return await execute(pipe, raise_on_error)

        monkeypatch.setattr(BatchedScript, "__call__", script_call)
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "watch", pipeline_watch)
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", pipeline_execute)
        yield self


# --- a workload touching every script and transaction -----------------------------------------------

TEAM, PROJECT, MODEL = "search", "ranking", "smollm2-135m-instruct"


def usage(request_id: str, team: str = TEAM, budget_period: str = "") -> UsageRecord:
    now = time.time()
    record = UsageRecord(
        request_id=request_id, team=team, project=PROJECT, key_id="k", model=MODEL, worker_id="w1",
        hardware_class="cpu", device_count=1, prompt_tokens=12, cached_tokens=0, completion_tokens=4,
        gpu_seconds=0.25, queue_ms=0, ttft_ms=0, total_ms=0, status="OK", finish_reason="stop",
        started_at=now - 1, ended_at=now, budget_period=budget_period)
    return price_record(PriceBook.load(DEFAULT_PRICE_BOOK), record)


async def workload(client: Any) -> dict[str, Any]:
    """What a gateway, a worker and the accounting service do in Redis, through their own code; returns
    what they saw."""
    seen: dict[str, Any] = {}
    key_store = KeyStore(client)
    key, info = await key_store.create(TEAM, PROJECT, Role.ADMIN)
    seen["authenticated"] = (await key_store.authenticate([("authorization", f"Bearer {key}")])).team
    await key_store.revoke(info.key_id)
    try:
        await key_store.authenticate([("authorization", f"Bearer {key}")])
    except Unauthenticated:
        seen["revoked"] = True
    seen["listed"] = [i.key_id for i in await key_store.list()]
    prices = PriceBookStore(client)
    await prices.load(PriceBook.load(DEFAULT_PRICE_BOOK))
    seen["price_book"] = (await prices.ensure()).version

    limit_store, budgets, limiter = LimitStore(client, cache_ttl_s=0), Budgets(client), RateLimiter(client)
    await limit_store.update(TEAM, "", {"requests_per_minute": 100, "max_concurrent_requests": 4})
    await limit_store.update(TEAM, PROJECT, {"tokens_per_minute": 10_000, "max_concurrent_requests": 2})
    seen["teams_with_limits"] = await limit_store.teams()
    await budgets.set(Budget(TEAM, hard_usd=100.0, soft_usd=0.0))
    limits = await limit_store.for_tenant(TEAM, PROJECT)

    # A request: its request_id's claim, admission and budget reservation share one round trip.
    tenant, idempotency = Tenant(TEAM, PROJECT, "k"), IdempotencyStore(client, ttl_s=60, lease_s=60)
    claim = (idempotency.key(tenant, "r1"), "owner-1")
    claimed, hold, reservation = await asyncio.gather(
        idempotency.claim_soon(tenant, "r1", claim[1]), limiter.admit(TEAM, "r1", limits, 40, claim=claim),
        budgets.reserve_soon(TEAM, PROJECT, "r1", max_cost_nusd=10**6, max_list_nusd=10**6, claim=claim))
    seen["claimed"], seen["reserved_month"] = claimed, reservation.month
    assert hold is not None
    await limiter.settle(hold, 16)
    ledger = Ledger(client)
    seen["recorded"] = await ledger.record(usage("r1", budget_period=reservation.month))
    seen["recorded_many"] = await ledger.record_many([usage("r2"), usage("r3", team="ads"), usage("r1")])
    await idempotency.complete(tenant, "r1", Outcome(grpc.StatusCode.OK, "done"))
    seen["replayed"] = (await idempotency.claim(tenant, "r1")).message
    await idempotency.claim(tenant, "r4", "owner-4")
    await idempotency.release(tenant, "r4")
    unused = await budgets.reserve(TEAM, PROJECT, "r5", max_cost_nusd=10, max_list_nusd=10)
    seen["released"] = await budgets.release(TEAM, unused)
    seen["released_stale"] = await budgets.release_stale(TEAM, max_age_s=0.0, now=time.time() + 1)
    seen["alerts"] = len(await budgets.alerts(TEAM))
    seen["spend"] = await budgets.spend(TEAM, month_of(time.time()))
    seen["requests"] = {row[0][0]: row[1].requests
                        for row in (await usage_report(ledger, ["team"], until=time.time() + 1)).rows}

    # Fair share and prefix homes: a gateway's; the registry, peers and device time: workers' and gateways'.
    counters = SharedCounterStore(client).counters(MODEL)
    counters.add((TEAM, PROJECT), 5.0)
    await counters.sync()
    seen["home"] = await SharedHomes(client, MODEL).claim("a prompt's prefix", 64, [("w1", 4096), ("w2", 4096)])
    registry = WorkerRegistry(client, ttl_s=5.0)
    await registry.heartbeat(WorkerRegistration("w1", "10.0.0.1:50052", MODEL, "cpu", 1, 1, 4096), WorkerLoad())
    seen["workers"] = [w.registration.worker_id for w in await registry.workers()]
    await registry.deregister("w1")
    peers = GatewayPeers(client, "g1")
    seen["peers"] = await peers.beat([MODEL])
    await peers.leave()
    capacity = CapacityStore(client)
    await capacity.register(WorkerInfo("w1", "cpu", 1, MODEL))
    await capacity.add("w1", time.time() - 7200, time.time(), device_ns=10**12, idle_ns=10**11)
    seen["capacity_hours"] = len(await capacity.cells())
    return seen


def check_workload(seen: dict[str, Any]) -> None:
    assert seen["authenticated"] == TEAM and seen["revoked"] and len(seen["listed"]) == 1
    assert seen["teams_with_limits"] == [TEAM] and seen["price_book"]
    assert seen["claimed"] is None and seen["reserved_month"] == month_of(time.time())
    assert seen["recorded"] is True and seen["recorded_many"] == 2  # r1 was recorded already
    assert seen["replayed"] == "done" and seen["released"] and seen["released_stale"] == 0
    assert seen["alerts"] == 1  # the soft threshold (0) was crossed once
    assert seen["spend"]["team:list"] > 0 and seen["spend"].get("team:reserved_list", 0) == 0
    assert seen["requests"] == {TEAM: 2, "ads": 1}
    assert seen["home"] in ("w1", "w2") and seen["workers"] == ["w1"] and seen["peers"] == {MODEL: 1}
    assert seen["capacity_hours"] in (2, 3)


def test_the_source_has_no_multi_key_command_a_cluster_would_refuse() -> None:
    assert multi_key_calls() == []


def test_every_script_call_and_transaction_touches_one_hash_slot(with_redis, redis_client,  # noqa: ANN001
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(redis_client)
    with recorder.recording(monkeypatch):
        check_workload(with_redis(workload))
    across = [t for t in recorder.touches if len(t.slots) > 1]
    assert across == [], "\n".join(f"{t.kind} at {t.site}: {t.keys}" for t in across)
    scripted = {name for t in recorder.touches if t.kind.startswith("script") for name in t.kind[7:].split("+")}
    assert scripted == {path.stem for path in LUA.glob("*.lua")}, "a Lua script the workload never ran"
    ran = {t.site for t in recorder.touches if t.kind == "transaction"}
    assert transaction_sites() <= ran, f"transactions the workload never ran: {transaction_sites() - ran}"


@pytest.mark.redis_cluster
def test_the_workload_runs_on_a_redis_cluster(with_redis, redis_backend: str) -> None:  # noqa: ANN001
    """On the cluster, a script or a transaction across slots would fail (CROSSSLOT, or redis-py's own
    check before sending): it runs, and sees what it sees on one server."""
    check_workload(with_redis(workload))


def test_a_gateway_serves_limits_and_records_through_a_redis_cluster(  # noqa: ANN001
        background_loop, redis_cluster, tiny_checkpoint) -> None:
    """A request_id's claim, the admission, the budget reservation, the usage record and the settling,
    through a real gateway on a 3-master cluster: a replay is answered from its stored outcome and counts
    for nothing, the limit refuses the request past it, the records land once and the slots come back."""
    redis_cluster.flushall()
    url, team = redis_cluster.url, f"t-{uuid.uuid4().hex[:6]}"
    key = create_key(background_loop, url, team)

    async def configure() -> None:
        client = connect(url)
        try:
            await LimitStore(client).set(Limits(team, requests_per_minute=3, tokens_per_minute=10_000,
                                                max_concurrent_requests=1))
            await Budgets(client).set(Budget(team, hard_usd=100.0))
        finally:
            await client.aclose()
    background_loop.run(configure())
    request = pb.GenerateRequest(model="tiny-llama", prompt="order", request_id="order-1",
                                 sampling=pb.SamplingParams(max_tokens=2, temperature=0))
    plain = pb.GenerateRequest(model="tiny-llama", prompt="hi", sampling=pb.SamplingParams(max_tokens=1,
                                                                                          temperature=0))
    with tiny_workers(background_loop, tiny_checkpoint, 1) as workers, \
            gateway(background_loop, url, (workers[0].address,)) as address:
        client = Client(address, key)
        first = client.Generate(request)
        assert all(client.Generate(request) == first for _ in range(3))
        client.Generate(plain)
        client.Generate(plain)
        with pytest.raises(grpc.RpcError) as refused:
            client.Generate(plain)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.Generate(request) == first  # at the limit, the stored answer still comes back

    async def state() -> tuple[list[str], int, dict[str, int]]:
        client = connect(url)
        try:
            records = [r.request_id async for r in Ledger(client).records(team)]
            return records, await client.zcard(keys.inflight(team, "team")), \
                await Budgets(client).spend(team, month_of(time.time()))
        finally:
            await client.aclose()
    records, slots, spend = background_loop.run(state())
    assert records.count("order-1") == 1 and len(records) == 3
    assert slots == 0 and spend["team:list"] > 0 and spend.get("team:reserved_list", 0) == 0
