"""Tiny random-weight workers on free ports, optionally registered in Redis, and gateways in front."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fareway.auth import KeyStore, Role
from fareway.inference.v1 import inference_pb2_grpc
from fareway.redis import connect
from fareway.registry import WorkerRegistry
from gateway.config import GatewayConfig
from gateway.service import running_gateway
from workers.config import RunnerConfig, WorkerConfig
from workers.heartbeat import RegistryHeartbeat
from workers.server import create_worker_server
from workers.worker import Worker


@dataclass
class TinyWorker:
    worker: Worker
    server: Any
    address: str
    heartbeat: RegistryHeartbeat | None = None


@contextlib.contextmanager
def tiny_workers(background_loop, checkpoint, count: int, redis_url: str | None = None,  # noqa: ANN001
                 ttl_s: float = 1.0) -> Iterator[list[TinyWorker]]:
    """`count` workers of the tiny model; registered (heartbeat every 0.2 s) when redis_url is given."""
    exits = contextlib.AsyncExitStack()

    async def start(i: int) -> TinyWorker:
        worker = Worker(WorkerConfig(worker_id=f"tiny-{i}", runner=RunnerConfig(
            device="cpu", kv_cache_memory_bytes=8 << 20)), checkpoint)
        server = await create_worker_server(worker, "127.0.0.1:0")
        exits.callback(worker.stop)
        exits.push_async_callback(server.stop, 0)
        tiny = TinyWorker(worker, server, f"127.0.0.1:{server.port}")
        if redis_url is not None:
            client = connect(redis_url)
            exits.push_async_callback(client.aclose)
            tiny.heartbeat = RegistryHeartbeat(worker, WorkerRegistry(client, ttl_s=ttl_s), tiny.address,
                                               interval_s=0.2)
            await tiny.heartbeat.start()
            exits.push_async_callback(tiny.heartbeat.pause)
        return tiny
    try:
        yield [background_loop.run(start(i)) for i in range(count)]
    finally:
        background_loop.run(exits.aclose())


@contextlib.contextmanager
def gateway(background_loop, redis_url: str, workers: tuple[str, ...] = (), **config: Any) -> Iterator[str]:  # noqa: ANN001
    exits = contextlib.AsyncExitStack()

    async def start() -> int:
        client = connect(redis_url)
        exits.push_async_callback(client.aclose)
        settings = {"worker_refresh_interval_s": 0.2, "registry_poll_interval_s": 0.2, **config}
        server = await exits.enter_async_context(running_gateway(GatewayConfig(
            workers=workers, listen="127.0.0.1:0", **settings), client))
        return server.port
    port = background_loop.run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        background_loop.run(exits.aclose())


def create_key(background_loop, redis_url: str, team: str) -> str:  # noqa: ANN001
    async def create() -> str:
        client = connect(redis_url)
        try:
            key, _ = await KeyStore(client).create(team, "main", Role.TENANT)
            return key
        finally:
            await client.aclose()
    return background_loop.run(create())


class Client:
    def __init__(self, address: str, key: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),)

    def __getattr__(self, rpc: str) -> Any:
        method = getattr(self.stub, rpc)
        return lambda request, **kw: method(request, metadata=self.metadata, timeout=30, **kw)
