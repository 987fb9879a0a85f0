"""A worker process from start to drained shutdown: the model, its gRPC server, its heartbeat in the
registry and its device-time reports to accounting."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from accounting.recorder import CapacityStore, hardware_price
from fareway.grpc_server import RunningServer
from fareway.process import wait_for_shutdown_signal
from fareway.redis import Client, connect
from fareway.registry import WorkerRegistry
from workers.capacity_reporter import CapacityReporter
from workers.config import WorkerConfig
from workers.heartbeat import RegistryHeartbeat, advertised_address
from workers.loader import default_model_path, load_checkpoint
from workers.model_runner import follow
from workers.parallel.group import RankGroup
from workers.parallel.launcher import Rendezvous
from workers.replica import Replica
from workers.server import create_worker_server
from workers.worker import Worker

log = logging.getLogger(__name__)


async def serve(config: WorkerConfig, redis_url: str | None, group: RankGroup | None = None) -> int:
    """Serves until SIGINT/SIGTERM (exit code 0) or until the worker fails (1: a rank died). With
    `redis_url` the worker registers (and leaves the registry first at shutdown) and reports its
    device time; without it, neither."""
    worker = await asyncio.to_thread(Worker, config, None, group)
    server = await create_worker_server(worker, config.listen, config.tls.credentials() if config.tls else None)
    log.info("worker %s listening on port %d", config.worker_id, server.port)
    try:
        async with in_the_fleet(worker, server, redis_url,
                                advertised_address(config.listen, server.port, config.advertise_address),
                                config.drain_timeout_s):
            failure = await _shutdown_signal_or_failure(worker)
    finally:
        worker.stop()
    if failure is not None:
        log.error("worker %s stopped: %s", config.worker_id, failure)
        return 1
    return 0


@contextlib.asynccontextmanager
async def in_the_fleet(replica: Replica, server: RunningServer, redis_url: str | None, address: str,
                       drain_timeout_s: float) -> AsyncIterator[None]:
    """While the block runs, with `redis_url`, the replica is registered at `address` and reports its
    device time. When the block ends it leaves the registry first, then the server lets in-flight
    requests finish for up to `drain_timeout_s` while refusing new ones; its last device time is
    reported after that. The caller stops the replica."""
    if redis_url is None:
        log.info("REDIS_URL is not set: this worker does not register in the worker registry, "
                 "and its idle device time is not reported to accounting")
    redis = connect(redis_url) if redis_url else None
    reporter = heartbeat = None
    try:
        if redis is not None:
            reporter = await capacity_reporter(replica, redis)
            heartbeat = await registry_heartbeat(replica, redis, address)
        yield
    finally:
        if heartbeat is not None:
            await heartbeat.stop()
        await server.stop(drain_timeout_s)
        if reporter is not None:
            await reporter.stop()
        if redis is not None:
            await redis.aclose()


async def registry_heartbeat(replica: Replica, redis: Client, address: str) -> RegistryHeartbeat:
    """Registers the replica at `address` (what gateways dial), with its hardware's price, and keeps it
    registered."""
    heartbeat = RegistryHeartbeat(replica, WorkerRegistry(redis), address)
    await heartbeat.start(await hardware_price(redis, replica.hardware_class))
    return heartbeat


async def _shutdown_signal_or_failure(worker: Worker) -> str | None:
    """Waits for SIGINT/SIGTERM (None) or the worker's failure (why it failed)."""
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def set_failed(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)
    worker.on_failure(lambda reason: loop.call_soon_threadsafe(set_failed, reason))
    signalled = asyncio.ensure_future(wait_for_shutdown_signal())
    await asyncio.wait([signalled, failed], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    return failed.result() if failed.done() else None


async def capacity_reporter(replica: Replica, redis: Client) -> CapacityReporter:
    """Reports the replica's device time to accounting."""
    reporter = CapacityReporter(replica, CapacityStore(redis))
    await reporter.start()
    return reporter


def serve_rank(config: WorkerConfig, rendezvous: Rendezvous, redis_url: str | None) -> int:
    """Under torchrun: rank 0 serves, the other ranks follow its steps."""
    size = config.runner.tensor_parallel_size
    if size not in (1, rendezvous.world_size):
        raise ValueError(f"--tensor-parallel-size {size} disagrees with torchrun's WORLD_SIZE {rendezvous.world_size}")
    config = dataclasses.replace(config, runner=dataclasses.replace(
        config.runner, tensor_parallel_size=rendezvous.world_size))
    group = rendezvous.join(config.runner)
    if rendezvous.rank == 0:
        return asyncio.run(serve(config, redis_url, group))
    follow(load_checkpoint(config.model_path or default_model_path()), config.runner, group)
    return 0
