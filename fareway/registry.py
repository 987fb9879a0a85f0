"""The worker registry in Redis: workers write themselves and their load, gateways read.

  fw:{registry}:worker:<worker_id>   hash: the worker's registration and its latest load;
                                     EXPIRE ttl_s, renewed by every heartbeat (about 1 s)
  fw:{registry}:workers              sorted set: worker_id -> when its hash expires (unix s)

A gateway's read is O(workers): drop the index entries whose time has passed,
then read every remaining hash in one pipeline (a hash that expired a moment
early is skipped). A worker that stops heartbeating disappears with its hash's
TTL; one that shuts down deletes both at once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from fareway.redis import keys

DEFAULT_TTL_S = 5.0
"""How long a worker stays registered after its last heartbeat."""


@dataclass(frozen=True)
class WorkerRegistration:
    """What a worker is: written at start, unchanged while it runs."""

    worker_id: str
    address: str
    """Where gateways reach it (host:port)."""
    model: str
    hardware_class: str
    device_count: int
    tensor_parallel_size: int
    kv_capacity_tokens: int
    usd_per_device_hour: float | None = None
    """Its hardware class's price from the price book in Redis; None when none was loaded."""

    def __post_init__(self) -> None:
        if not self.worker_id or not self.address or not self.model:
            raise ValueError("a registration needs a worker id, an address and a model")
        if self.device_count < 1:
            raise ValueError(f"device_count must be at least 1, got {self.device_count}")


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker is doing: published with every heartbeat."""

    num_running: int = 0
    num_waiting: int = 0
    kv_tokens_free: int = 0
    tokens_per_s: float = 0.0
    """Completion tokens per second of busy engine time, smoothed; 0 until measured."""
    prefix_cache_hit_rate: float = 0.0

    @property
    def num_queued(self) -> int:
        """Sequences waiting or running."""
        return self.num_running + self.num_waiting


@dataclass(frozen=True)
class RegisteredWorker:
    registration: WorkerRegistration
    load: WorkerLoad
    updated_at: float
    """Unix seconds of the heartbeat that wrote `load`."""


_INT_FIELDS = {f.name for cls in (WorkerRegistration, WorkerLoad) for f in dataclasses.fields(cls)
               if f.type == "int"}
_FLOAT_FIELDS = {f.name for cls in (WorkerRegistration, WorkerLoad) for f in dataclasses.fields(cls)
                 if f.type in ("float", "float | None")}


def _to_hash(worker: RegisteredWorker) -> dict[str, str]:
    fields = dataclasses.asdict(worker.registration) | dataclasses.asdict(worker.load)
    return {name: "" if value is None else str(value) for name, value in fields.items()} | {
        "updated_at": repr(worker.updated_at)}


def _from_hash(raw: dict[str, str]) -> RegisteredWorker:
    def value(name: str) -> object:
        text = raw.get(name, "")
        if name in _INT_FIELDS:
            return int(text or 0)
        if name in _FLOAT_FIELDS:
            return float(text) if text else None
        return text
    registration = WorkerRegistration(**{f.name: value(f.name) for f in dataclasses.fields(WorkerRegistration)})
    load = WorkerLoad(**{f.name: value(f.name) or 0 for f in dataclasses.fields(WorkerLoad)})
    return RegisteredWorker(registration, load, float(raw.get("updated_at") or 0.0))


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._redis = redis
        self.ttl_s = ttl_s

    async def heartbeat(self, registration: WorkerRegistration, load: WorkerLoad,
                        now: float | None = None) -> None:
        """Writes (or re-creates) the worker's entry with its load, good for ttl_s."""
        now = time.time() if now is None else now
        key = keys.registered_worker(registration.worker_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=_to_hash(RegisteredWorker(registration, load, now)))
            pipe.pexpire(key, round(self.ttl_s * 1000))
            pipe.zadd(keys.REGISTERED_WORKERS, {registration.worker_id: now + self.ttl_s})
            await pipe.execute()

    async def deregister(self, worker_id: str) -> None:
        """Takes the worker out of every gateway's pool at their next read."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.registered_worker(worker_id))
            pipe.zrem(keys.REGISTERED_WORKERS, worker_id)
            await pipe.execute()

    async def workers(self, now: float | None = None) -> list[RegisteredWorker]:
        """Every worker whose last heartbeat is younger than the TTL, by worker id."""
        now = time.time() if now is None else now
        await self._redis.zremrangebyscore(keys.REGISTERED_WORKERS, "-inf", now)
        ids = [i.decode() if isinstance(i, bytes) else i for i in await self._redis.zrange(keys.REGISTERED_WORKERS, 0, -1)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(keys.registered_worker(worker_id))
            hashes = await pipe.execute()
        found = []
        for raw in hashes:
            if raw:
                found.append(_from_hash({_text(k): _text(v) for k, v in raw.items()}))
        return found


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GatewayPeers:
    """The gateway replicas in front of a model's workers, counted so each takes its share of them.

      fw:{registry}:gateways:<model>   sorted set: gateway id -> when its membership lapses (unix s)

    Each gateway renews its entry for every model it serves about once a second (`beat`), which
    also drops lapsed entries and counts the rest; a gateway that stops is forgotten after ttl_s.
    """

    def __init__(self, redis: aioredis.Redis, gateway_id: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._redis = redis
        self.gateway_id = gateway_id
        self.ttl_s = ttl_s
        self._counts: dict[str, int] = {}
        self._announced: set[str] = set()  # every model an entry may have been written for

    def count(self, model: str) -> int:
        """Live gateways serving `model`, this one included, as of the last beat (1 before any)."""
        return self._counts.get(model, 1)

    async def beat(self, models: list[str], now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        self._announced.update(models)  # before sending: a beat cut off mid-reply may have landed
        async with self._redis.pipeline(transaction=True) as pipe:
            for model in models:
                pipe.zadd(keys.gateways(model), {self.gateway_id: now + self.ttl_s})
                pipe.zremrangebyscore(keys.gateways(model), "-inf", now)
                pipe.zcard(keys.gateways(model))
            results = await pipe.execute()
        self._counts = {model: max(int(results[3 * i + 2]), 1) for i, model in enumerate(models)}
        return dict(self._counts)

    async def leave(self) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for model in self._announced:
                pipe.zrem(keys.gateways(model), self.gateway_id)
            await pipe.execute()
