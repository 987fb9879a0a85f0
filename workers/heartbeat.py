"""Keeps the worker in the registry (fareway/registry.py): registers it at start,
publishes its load about once a second, and takes it out first at shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket

from fareway.process import stop_task
from fareway.redis import UNREACHABLE
from fareway.registry import WorkerLoad, WorkerRegistration, WorkerRegistry
from workers.engine.llm_engine import LoadSnapshot
from workers.replica import Replica

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
_THROUGHPUT_SMOOTHING = 0.3
"""Weight of the latest interval in the tokens/s average (an exponential moving average)."""


def advertised_address(listen: str, port: int, advertise: str | None = None) -> str:
    """Where gateways should dial: `advertise` if given, else the listen address with the bound
    port and a wildcard host (0.0.0.0, [::], empty) replaced by this machine's host name."""
    if advertise:
        return advertise
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


class ThroughputMeter:
    """Completion tokens per second of busy engine time, from successive load snapshots."""

    def __init__(self, num_devices: int) -> None:
        self.num_devices = num_devices
        self.tokens_per_s = 0.0
        self._last: tuple[int, float] | None = None

    def update(self, load: LoadSnapshot) -> float:
        busy_s = load.attributed_gpu_seconds / self.num_devices
        if self._last is not None:
            tokens, last_busy_s = load.num_generated_tokens - self._last[0], busy_s - self._last[1]
            if tokens > 0 and last_busy_s > 0:
                rate = tokens / last_busy_s
                self.tokens_per_s = rate if not self.tokens_per_s else (
                    _THROUGHPUT_SMOOTHING * rate + (1 - _THROUGHPUT_SMOOTHING) * self.tokens_per_s)
        self._last = (load.num_generated_tokens, busy_s)
        return self.tokens_per_s


class RegistryHeartbeat:
    def __init__(self, worker: Replica, registry: WorkerRegistry, address: str,
                 interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        if interval_s >= registry.ttl_s:
            raise ValueError(f"the heartbeat interval ({interval_s} s) must be shorter than the TTL "
                             f"({registry.ttl_s} s)")
        self.worker = worker
        self.registry = registry
        self.address = address
        self.interval_s = interval_s
        self.registration: WorkerRegistration | None = None
        self._throughput = ThroughputMeter(worker.num_devices)
        self._task: asyncio.Task[None] | None = None

    async def start(self, usd_per_device_hour: float | None = None) -> None:
        """Registers the worker, with its hardware's price per device-hour if one is known."""
        w = self.worker
        self.registration = WorkerRegistration(
            worker_id=w.worker_id, address=self.address, model=w.model_name, hardware_class=w.hardware_class,
            device_count=w.num_devices, tensor_parallel_size=w.tensor_parallel_size,
            kv_capacity_tokens=w.kv_capacity_tokens, usd_per_device_hour=usd_per_device_hour)
        await self.beat()
        log.info("worker %s registered at %s", self.worker.worker_id, self.address)
        self._task = asyncio.get_running_loop().create_task(self._beat_forever())

    def load(self) -> WorkerLoad:
        snapshot = self.worker.load()
        return WorkerLoad(
            num_running=snapshot.num_running, num_waiting=snapshot.num_waiting,
            kv_tokens_free=snapshot.kv_blocks_free * snapshot.kv_block_size,
            tokens_per_s=self._throughput.update(snapshot), prefix_cache_hit_rate=snapshot.prefix_cache_hit_rate)

    async def beat(self) -> None:
        if self.registration is None:
            raise RuntimeError("start() the heartbeat first")
        await self.registry.heartbeat(self.registration, self.load())

    async def stop(self) -> None:
        """Stops heartbeating and deregisters: gateways stop sending new requests."""
        await self.pause()
        if self.registration is not None:
            try:
                await self.registry.deregister(self.registration.worker_id)
            except UNREACHABLE as exc:
                log.warning("could not deregister (the entry expires by itself): %s", exc)

    async def pause(self) -> None:
        """Stops heartbeating without deregistering: the entry expires after the TTL."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except UNREACHABLE as exc:
                # The entry expires if Redis stays away; the next beat that gets through re-creates it.
                log.warning("could not heartbeat to Redis: %s", exc)
            except Exception:  # noqa: BLE001 - one bad beat must not end the heartbeats for good
                log.exception("heartbeat failed (retried in %.1f s)", self.interval_s)
