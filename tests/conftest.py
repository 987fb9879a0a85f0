"""Fixtures shared by every suite: a real Redis server, and an event loop in a
background thread that hosts real gRPC servers (tests call them over sockets
with ordinary synchronous clients, as a service would)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from fareway.net import free_port
from fareway.redis.embedded import EmbeddedRedis

T = TypeVar("T")


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
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied for this test."""
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
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


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
