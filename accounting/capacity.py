"""Device time per worker and hour, split into time charged to requests and
idle time, as each worker's engine meters it. Idle device time is what a
fleet costs beyond its requests; reports price it as "idle" so it never
silently vanishes, and only devices that reported time can have any.

Per worker (hash-tagged by worker, so one worker's keys share a Cluster slot):
  fw:{worker:<id>}:capacity:<YYYY-MM-DDTHH>   device_ns, idle_ns -> integers
  fw:{worker:<id>}:capacity:hours              the hours above, scored by their start
  fw:{worker:<id>}:info                        hardware_class, device_count, model
and fw:capacity:workers, the set of worker ids that ever reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from accounting.rollups import bucket_start, hour_bucket
from fareway.redis import keys

_HOUR_S = 3600


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    hardware_class: str
    device_count: int
    model: str
    metering: str = "engine-steps"
    """How its device time is split across requests: "engine-steps" (Fareway's engine) or "observed"
    (a worker in front of another engine)."""


@dataclass(frozen=True)
class CapacityCell:
    """One worker's device time in one hour."""

    worker: WorkerInfo
    hour: str
    device_ns: int
    """Wall time x devices."""
    idle_ns: int
    """Of which nothing ran."""

    @property
    def attributed_ns(self) -> int:
        return self.device_ns - self.idle_ns


def split_by_hour(start: float, end: float, device_ns: int, idle_ns: int) -> list[tuple[str, int, int]]:
    """Spreads a sample of device time over the hours [start, end) covers, in proportion to
    the time in each; the parts add up to the whole exactly."""
    if end <= start:
        return [(hour_bucket(end), device_ns, idle_ns)]
    edges = [start]
    boundary = math.floor(start / _HOUR_S) * _HOUR_S + _HOUR_S
    while boundary < end:
        edges.append(boundary)
        boundary += _HOUR_S
    edges.append(end)
    parts = []
    device_left, idle_left = device_ns, idle_ns
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        share = (b - a) / (end - start)
        device = device_left if last else round(device_ns * share)
        idle = idle_left if last else min(round(idle_ns * share), device)
        device_left -= device
        idle_left -= idle
        parts.append((hour_bucket(a), device, idle))
    return parts


class CapacityStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def register(self, info: WorkerInfo) -> None:
        await self._redis.hset(keys.worker_info(info.worker_id), mapping={
            "hardware_class": info.hardware_class, "device_count": info.device_count, "model": info.model,
            "metering": info.metering})
        await self._redis.sadd(keys.DEVICE_TIME_WORKERS, info.worker_id)

    async def add(self, worker_id: str, start: float, end: float, device_ns: int, idle_ns: int) -> None:
        """Adds a sample: device_ns of device time over [start, end), idle_ns of it idle."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for hour, device, idle in split_by_hour(start, end, device_ns, idle_ns):
                pipe.hincrby(keys.device_time(worker_id, hour), "device_ns", device)
                pipe.hincrby(keys.device_time(worker_id, hour), "idle_ns", idle)
                pipe.zadd(keys.device_time_hours(worker_id), {hour: bucket_start(hour)})
            await pipe.execute()

    async def workers(self) -> list[WorkerInfo]:
        infos = []
        for worker_id in sorted(await self._redis.smembers(keys.DEVICE_TIME_WORKERS)):
            values = await self._redis.hgetall(keys.worker_info(worker_id))
            infos.append(WorkerInfo(worker_id, values.get("hardware_class", ""),
                                    int(values.get("device_count", 1)), values.get("model", ""),
                                    values.get("metering", "engine-steps")))
        return infos

    async def cells(self, since: float | None = None, until: float | None = None,
                    workers: Sequence[str] | None = None) -> list[CapacityCell]:
        """Every worker's device time per hour whose start lies in [since, until)."""
        cells = []
        for info in await self.workers():
            if workers is not None and info.worker_id not in workers:
                continue
            hours = await self._redis.zrangebyscore(keys.device_time_hours(info.worker_id),
                                                    "-inf" if since is None else since,
                                                    f"({until}" if until is not None else "+inf")
            async with self._redis.pipeline(transaction=False) as pipe:
                for hour in hours:
                    pipe.hgetall(keys.device_time(info.worker_id, hour))
                contents = await pipe.execute()
            for hour, values in zip(hours, contents):
                cells.append(CapacityCell(info, hour, int(values.get("device_ns", 0)), int(values.get("idle_ns", 0))))
        return cells
