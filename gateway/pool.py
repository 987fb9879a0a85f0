"""The workers a gateway dispatches to, and what each serves.

Each worker's model info is re-read in the background; a worker that cannot
be reached is marked down and retried at the next refresh. A configured
address whose host is a DNS name stands for every address the name resolves
to (docker compose's `--scale worker=N`, a Kubernetes headless service), and
is resolved again at each refresh as replicas come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from fareway.errors import NotFound, Unavailable
from fareway.tls import ChannelTls, aio_channel
from fareway.worker.v1 import worker_pb2 as pb
from fareway.worker.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

_INFO_TIMEOUT_S = 2.0


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

    @property
    def name(self) -> str:
        return self.info.worker_id if self.info else self.address


@dataclass
class WorkerPool:
    addresses: tuple[str, ...]
    refresh_interval_s: float
    on_refresh: Callable[[bool], Awaitable[None]] | None = None
    """Called after each refresh with whether any worker is up (the gateway's health follows it)."""
    tls: ChannelTls | None = None
    """How to reach the workers over TLS; None: plaintext."""
    endpoints: list[WorkerEndpoint] = field(init=False, default_factory=list)
    _refresher: asyncio.Task[None] | None = field(init=False, default=None)
    _turn: itertools.count[int] = field(init=False, default_factory=itertools.count)

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for endpoint in self.endpoints:
            await endpoint.channel.close()

    async def refresh(self) -> None:
        """Re-resolves the configured addresses, then re-reads every worker's model info."""
        resolved = await asyncio.gather(*(_resolve(address) for address in self.addresses))
        wanted = list(dict.fromkeys(a for addresses in resolved for a in addresses))
        current = {e.address: e for e in self.endpoints}
        for gone in current.keys() - set(wanted):
            await current[gone].channel.close()
        self.endpoints = [current.get(address) or _endpoint(address, self.tls) for address in wanted]
        await asyncio.gather(*(self._refresh_one(e) for e in self.endpoints))
        if self.on_refresh is not None:
            await self.on_refresh(self.is_serving)

    async def _refresh_one(self, endpoint: WorkerEndpoint) -> None:
        try:
            endpoint.info = await endpoint.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=_INFO_TIMEOUT_S)
            if not endpoint.is_up:
                log.info("worker %s at %s is up, serving %s", endpoint.name, endpoint.address, endpoint.info.model)
            endpoint.is_up = True
        except grpc.aio.AioRpcError as error:
            if endpoint.is_up:
                log.warning("worker at %s is down: %s", endpoint.address, error.code().name)
            endpoint.is_up = False

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            await self.refresh()

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

    def candidates(self, model: str) -> list[WorkerEndpoint]:
        """Workers to try for a model, in order: those up first, in rotation, then those down."""
        served = self.models()
        if model not in served:
            if not served:
                raise Unavailable("no worker is reachable yet; try again shortly")
            raise NotFound(f"model {model!r} is not served; available: {', '.join(sorted(served))}")
        workers = served[model]
        shift = next(self._turn) % len(workers)
        rotated = workers[shift:] + workers[:shift]
        return [e for e in rotated if e.is_up] + [e for e in rotated if not e.is_up]
