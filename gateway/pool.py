"""The workers a gateway dispatches to, and what each serves.

Each worker's model info is re-read in the background; a worker that cannot
be reached is marked down and retried at the next refresh. A configured
address whose host is a DNS name stands for every address the name resolves
to (docker compose's `--scale worker=N`, a Kubernetes headless service), and
is resolved again at each refresh as replicas come and go.

With a registry (fareway/registry.py), the workers registered in Redis join
the configured ones: the pool re-reads the registry about once a second, adds
the workers that registered, drops those whose entry expired or was deleted,
and takes each one's published load for routing. A registered worker that is
also configured (same worker id or address) is one endpoint. Configured
workers' load is polled with their model info at each refresh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from fareway.errors import NotFound, Unavailable, shown
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.process import stop_task
from fareway.redis import UNREACHABLE
from fareway.registry import WorkerLoad, WorkerRegistration, WorkerRegistry
from fareway.tls import ChannelTls, aio_channel
from fareway.worker.v1 import worker_pb2 as pb
from fareway.worker.v1 import worker_pb2_grpc
from gateway.routing import Route, Router

log = logging.getLogger(__name__)

_INFO_TIMEOUT_S = 2.0
# How long a request waits for its prefix's shared home to be claimed before routing without it.
_CLAIM_WAIT_S = 0.5


def _endpoint(address: str, tls: ChannelTls | None) -> WorkerEndpoint:
    channel = aio_channel(address, tls)
    return WorkerEndpoint(address, channel, worker_pb2_grpc.WorkerServiceStub(channel))


async def _resolve(address: str) -> list[str]:
    """host:port -> every host:port it stands for (itself for IP literals and localhost)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host == "localhost" or _is_ip(host):
        return [address]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        log.warning("cannot resolve worker address %s: %s", address, error)
        return []
    ips = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET}) or \
        sorted({info[4][0] for info in infos})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class WorkerEndpoint:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceStub
    info: pb.GetModelInfoResponse | None = None
    """The last model info read; None until the worker was first reached."""
    is_up: bool = False
    registration: WorkerRegistration | None = None
    """Its entry in the registry; None for a configured worker that did not register."""
    load: WorkerLoad = field(default_factory=WorkerLoad)
    """Its load as last published (registry) or polled (configured workers)."""
    num_in_flight: int = 0
    """Requests this gateway has sent it that have not ended yet."""
    _num_in_flight_at_load: int = 0

    @property
    def name(self) -> str:
        if self.info:
            return self.info.worker_id
        return self.registration.worker_id if self.registration else self.address

    @property
    def num_queued(self) -> int:
        """Its sequences, estimated now: the other gateways' as of its last load report, and this
        gateway's own as they are (a burst sent since the report counts; requests ended since, not)."""
        return max(0, self.load.num_queued - self._num_in_flight_at_load) + self.num_in_flight

    @property
    def usd_per_device_hour(self) -> float | None:
        return self.registration.usd_per_device_hour if self.registration else None

    @property
    def device_count(self) -> int:
        if self.registration:
            return self.registration.device_count
        return max(self.info.device_count, 1) if self.info else 1

    @property
    def kv_capacity_tokens(self) -> int:
        if self.info and self.info.kv_capacity_tokens:
            return self.info.kv_capacity_tokens
        return self.registration.kv_capacity_tokens if self.registration else 0

    def set_load(self, load: WorkerLoad) -> None:
        self.load, self._num_in_flight_at_load = load, self.num_in_flight


@dataclass
class WorkerPool:
    addresses: tuple[str, ...]
    """Configured worker addresses (host:port); DNS names stand for every address they resolve to."""
    refresh_interval_s: float
    on_refresh: Callable[[bool], Awaitable[None]] | None = None
    """Called after each refresh with whether any worker is up (the gateway's health follows it)."""
    tls: ChannelTls | None = None
    """How to reach the workers over TLS; None: plaintext."""
    registry: WorkerRegistry | None = None
    """Where workers register themselves; None: only the configured addresses."""
    registry_poll_interval_s: float = 1.0
    router: Router = field(default_factory=Router)
    endpoints: list[WorkerEndpoint] = field(init=False, default_factory=list)
    _configured: list[WorkerEndpoint] = field(init=False, default_factory=list)
    _registered: dict[str, WorkerEndpoint] = field(init=False, default_factory=dict)
    """Registered workers not also configured, by worker id."""
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)

    async def start(self) -> None:
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._every(self.refresh_interval_s, self.refresh)))
        if self.registry is not None:
            await self.poll_registry()
            self._tasks.append(loop.create_task(self._every(self.registry_poll_interval_s, self.poll_registry)))

    async def close(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        for endpoint in self.endpoints:
            await endpoint.channel.close()

    async def refresh(self) -> None:
        """Re-resolves the configured addresses, then re-reads every worker's model info."""
        resolved = await asyncio.gather(*(_resolve(address) for address in self.addresses))
        wanted = list(dict.fromkeys(a for addresses in resolved for a in addresses))
        current = {e.address: e for e in self._configured}
        self._configured = [current.get(address) or _endpoint(address, self.tls) for address in wanted]
        for gone in current.keys() - set(wanted):
            await self._close_unless_used(current[gone])
        self._rebuild()
        await asyncio.gather(*(self._refresh_one(e) for e in self.endpoints))
        if self.on_refresh is not None:
            await self.on_refresh(self.is_serving)

    async def poll_registry(self) -> None:
        """Takes in the registry's workers and their load; drops the workers that left it."""
        if self.registry is None:
            return
        try:
            entries = await self.registry.workers()
        except UNREACHABLE as exc:
            log.warning("cannot read the worker registry (keeping the workers known): %s", exc)
            return
        configured = {e.address: e for e in self._configured} | {
            e.info.worker_id: e for e in self._configured if e.info}
        for endpoint in self._configured:
            endpoint.registration = None
        registered, joined = {}, []
        for entry in entries:
            r = entry.registration
            endpoint = configured.get(r.worker_id) or configured.get(r.address)
            if endpoint is None:
                endpoint = self._registered.get(r.worker_id)
                if endpoint is None or endpoint.address != r.address:
                    endpoint = _endpoint(r.address, self.tls)
                    joined.append(endpoint)
                registered[r.worker_id] = endpoint
            endpoint.registration = r
            endpoint.set_load(entry.load)
        left = [e for worker_id, e in self._registered.items() if registered.get(worker_id) is not e]
        self._registered = registered
        for endpoint in left:
            log.info("worker %s at %s left the registry", endpoint.name, endpoint.address)
            await self._close_unless_used(endpoint)
        self._rebuild()
        await asyncio.gather(*(self._refresh_one(e) for e in joined))
        if (joined or left) and self.on_refresh is not None:
            await self.on_refresh(self.is_serving)

    def _rebuild(self) -> None:
        configured = {id(e) for e in self._configured}
        self.endpoints = self._configured + [e for e in self._registered.values() if id(e) not in configured]

    async def _close_unless_used(self, endpoint: WorkerEndpoint) -> None:
        if all(e is not endpoint for e in (*self._configured, *self._registered.values())):
            await endpoint.channel.close()

    async def _refresh_one(self, endpoint: WorkerEndpoint) -> None:
        try:
            endpoint.info = await endpoint.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=_INFO_TIMEOUT_S)
            if endpoint.registration is None:
                load = await endpoint.stub.GetLoad(pb.GetLoadRequest(), timeout=_INFO_TIMEOUT_S)
                endpoint.set_load(WorkerLoad(
                    num_running=load.num_running, num_waiting=load.num_waiting,
                    kv_tokens_free=load.kv_tokens_capacity - load.kv_tokens_used,
                    prefix_cache_hit_rate=load.prefix_cache_hit_rate))
            if not endpoint.is_up:
                log.info("worker %s at %s is up, serving %s", endpoint.name, endpoint.address, endpoint.info.model)
            endpoint.is_up = True
        except grpc.aio.AioRpcError as error:
            if endpoint.is_up:
                log.warning("worker at %s is down: %s", endpoint.address, error.code().name)
            endpoint.is_up = False
        except grpc.aio.UsageError:  # its channel was closed meanwhile: the worker left the registry
            endpoint.is_up = False

    @staticmethod
    async def _every(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        """Runs `action` every `interval_s`; a round that fails is logged, and the next one still runs."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await action()
            except Exception:  # noqa: BLE001 - one bad round must not end the worker refreshes for good
                log.exception("refreshing the worker pool failed (retried in %.1f s)", interval_s)

    def mark_down(self, endpoint: WorkerEndpoint) -> None:
        endpoint.is_up = False

    @property
    def is_serving(self) -> bool:
        return any(e.is_up for e in self.endpoints)

    def models(self) -> dict[str, list[WorkerEndpoint]]:
        """Model name -> the workers known to serve it (up or not)."""
        served: dict[str, list[WorkerEndpoint]] = {}
        for endpoint in self.endpoints:
            if endpoint.info is not None:
                served.setdefault(endpoint.info.model, []).append(endpoint)
        return served

    def serving(self, model: str) -> list[WorkerEndpoint]:
        """The workers known to serve a model (up or not); UNAVAILABLE or NOT_FOUND if none."""
        served = self.models()
        if model not in served:
            if not served:
                raise Unavailable("no worker is reachable yet; try again shortly")
            raise NotFound(f"model {shown(model)} is not served; available: {', '.join(sorted(served))}")
        return served[model]

    def num_sequence_slots(self, model: str) -> int:
        """Sequences the up workers of a model run at once (their max_num_seqs, summed)."""
        return sum(e.info.max_num_seqs for e in self.endpoints if e.is_up and e.info and e.info.model == model)

    async def learn_route(self, model: str, route: Route) -> None:
        """Before `candidates`: where the model's gateway replicas share prefix homes, and this one has
        none yet for the request's prefix, waits (at most _CLAIM_WAIT_S) for the home they agree on;
        past that, or with Redis unreachable, the request goes by this replica's own view."""
        claim = self.router.first_claim(model, [e for e in self.serving(model) if e.is_up], route)
        if claim is not None:
            await asyncio.wait([claim], timeout=_CLAIM_WAIT_S)  # cancelling the wait leaves the claim be

    def candidates(self, model: str, route: Route | None = None) -> list[WorkerEndpoint]:
        """Workers to try for a request, in order: those up, as the model's routing policy orders
        them for it (a routing decision: round-robin turns), then those down."""
        workers = self.serving(model)
        up = self.router.order(model, [e for e in workers if e.is_up], route or Route())
        return up + [e for e in workers if not e.is_up]  # type: ignore[return-value]


def served_models(pool: WorkerPool) -> list[ipb.Model]:
    """The models the pool's workers serve, by name: the least context length and the hardware classes of
    those up (ListModels, `GET /v1/models`)."""
    models = []
    for name, endpoints in sorted(pool.models().items()):
        up = [e for e in endpoints if e.is_up and e.info is not None]
        models.append(ipb.Model(
            id=name, context_length=min((e.info.context_length for e in up), default=0),
            hardware_classes=sorted({e.info.hardware_class for e in up}), num_workers=len(up)))
    return models
