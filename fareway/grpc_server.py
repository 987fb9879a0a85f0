"""A grpc.aio server with what every Fareway service serves besides its own API:
the standard health service, server reflection, and its errors answered as gRPC statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from fareway.errors import ErrorMappingServer

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceSpec:
    """One gRPC service to host: its full name and the generated `add_*_to_server` call."""

    name: str
    register: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        """Marks every hosted service (and the server as a whole, "") as (not) serving."""
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(
    address: str,
    services: Sequence[ServiceSpec],
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    serving: bool = True,
) -> RunningServer:
    """Starts a server on `address` ("host:0" picks a free port); its health says `serving`."""
    server = grpc.aio.server(interceptors=list(interceptors) or None, options=[("grpc.so_reuseport", 0)])
    for service in services:
        service.register(ErrorMappingServer(server))  # type: ignore[arg-type] - what add_*_to_server calls
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(s.name for s in services)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not listen on {address}")
    await server.start()
    running = RunningServer(server, port, health, names)
    await running.set_serving(serving)
    log.info("serving %s on port %d", ", ".join(names), port)
    return running

