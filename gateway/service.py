"""The public InferenceService: authenticate, then hand the request to the Dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis

from accounting.recorder import UsageRecorder
from fareway.auth import KeyStore
from fareway.config import RedisConfig
from fareway.errors import from_rpc_error
from fareway.grpc_server import RunningServer, ServiceSpec, start_server
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.process import stop_task, wait_for_shutdown_signal
from fareway.quota import Budgets, LimitStore, RateLimiter
from fareway.redis import UNREACHABLE, connect
from fareway.redis.embedded import resolve_url
from fareway.registry import GatewayPeers, WorkerRegistry
from fareway.validation import validate_input
from fareway.worker.v1 import worker_pb2 as wpb
from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.dispatch import Dispatcher
from gateway.fair_counters import SharedCounterStore
from gateway.fairness import FairScheduler
from gateway.finishing import Finisher
from gateway.http_edge import HttpEdge, serving_http
from gateway.idempotency import IdempotencyStore
from gateway.journal import Journal, Sweeper
from gateway.metrics import GatewayMetrics
from gateway.pool import WorkerPool, served_models
from gateway.routing import Router
from gateway.run import Delta, Final, copy_input
from gateway.shared_homes import SharedHomes
from gateway.tracing import generate_span, traced_stream

log = logging.getLogger(__name__)
_INFO_TIMEOUT_S = 5.0


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, keys: KeyStore, pool: WorkerPool, dispatcher: Dispatcher) -> None:
        self.keys = keys
        self.pool = pool
        self.dispatcher = dispatcher

    async def _events(self, request: pb.GenerateStreamRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Delta | Final]:
        tenant = await self.keys.authenticate(context.invocation_metadata())
        events = traced_stream(tenant, request, self.dispatcher.run(tenant, request, context),
                               lambda event: event.response.usage if isinstance(event, Final) else None)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        tenant = await self.keys.authenticate(context.invocation_metadata())
        with generate_span(tenant, request) as describe_usage:
            response = await self.dispatcher.complete(tenant, request, context)
            describe_usage(response.usage)
            return response

    async def GenerateStream(self, request: pb.GenerateStreamRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(self._events(request, context)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    yield pb.GenerateStreamResponse(
                        text=event.text, token_ids=event.token_ids, index=event.index, logprobs=event.logprobs,
                        finish_reason=event.finish_reason, stop_sequence=event.stop_sequence,
                        prompt_logprobs=event.prompt_logprobs)
                    continue
                r = event.response
                if event.replayed and r.choices:  # each stored sample in a message, then the usage
                    for i, c in enumerate(r.choices):
                        yield pb.GenerateStreamResponse(
                            text=c.text, token_ids=c.token_ids, index=c.index, logprobs=c.logprobs,
                            finish_reason=c.finish_reason, stop_sequence=c.stop_sequence,
                            prompt_logprobs=r.prompt_logprobs if i == 0 else ())
                    yield pb.GenerateStreamResponse(request_id=r.request_id, usage=r.usage)
                    continue
                # A replay streams the stored text in one message; a live run has sent it already (and with
                # n > 1, each sample's finish reason).
                yield pb.GenerateStreamResponse(
                    request_id=r.request_id, text=r.text if event.replayed else "",
                    token_ids=r.token_ids if event.replayed else [],
                    finish_reason=r.finish_reason if not r.choices else pb.FINISH_REASON_UNSPECIFIED,
                    stop_sequence=r.stop_sequence if not r.choices else "", usage=r.usage,
                    logprobs=r.logprobs if event.replayed else (),
                    prompt_logprobs=r.prompt_logprobs if event.replayed else ())

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await self.keys.authenticate(context.invocation_metadata())
        models = served_models(self.pool)
        return pb.ListModelsResponse(models=models)

    async def CountTokens(self, request: pb.CountTokensRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        await self.keys.authenticate(context.invocation_metadata())
        validate_input(request)
        endpoint = self.pool.candidates(request.model)[0]
        forwarded = wpb.CountTokensRequest(model=request.model)
        copy_input(request, forwarded)
        try:
            counted = await endpoint.stub.CountTokens(forwarded, timeout=_INFO_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return pb.CountTokensResponse(model=request.model, prompt_tokens=counted.prompt_tokens,
                                      context_length=counted.context_length)


@dataclass(frozen=True)
class RunningGateway:
    grpc: RunningServer
    http_port: int | None
    """The OpenAI-compatible edge's port; None when it is not served."""

    @property
    def port(self) -> int:
        """The gRPC port."""
        return self.grpc.port


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig, redis: aioredis.Redis,
                          credentials: grpc.ServerCredentials | None = None,
                          metrics: GatewayMetrics | None = None) -> AsyncIterator[RunningGateway]:
    """A gateway serving gRPC on config.listen (and HTTP on config.http_listen) until the block ends. Its
    health is SERVING only while at least one worker can be reached."""
    pool = WorkerPool(config.workers, config.worker_refresh_interval_s,
                      registry=WorkerRegistry(redis) if config.registry else None,
                      registry_poll_interval_s=config.registry_poll_interval_s,
                      router=Router(config.routing, dict(config.routing_by_model),
                                    (lambda model: SharedHomes(redis, model)) if config.shared_prefix_homes else None),
                      tls=config.worker_tls)
    idempotency = IdempotencyStore(redis, ttl_s=config.idempotency_ttl_s, lease_s=config.idempotency_lease_s)
    recorder = UsageRecorder.open(redis, config.spool_dir)
    metrics = metrics or GatewayMetrics()
    metrics.observe_pool(lambda: list(pool.endpoints))
    fairness = shared = None
    peers = GatewayPeers(redis, f"gateway-{uuid.uuid4().hex[:12]}")
    if config.fairness is not None:
        factor = config.fairness.capacity_factor
        if config.fairness.sync_interval_s:
            shared = SharedCounterStore(redis, config.fairness.sync_interval_s)
        # Each replica runs its share of the fleet's sequence slots. No slots known (no worker up):
        # nothing is held back, and the request fails as it would.
        fairness = FairScheduler(config.fairness, lambda model: math.ceil(n * factor / peers.count(model))
                                 if (n := pool.num_sequence_slots(model)) else None,
                                 **({"counters": shared.counters} if shared else {}))
        metrics.observe_queues(fairness.depths)
    keys = KeyStore(redis, config.key_cache_ttl_s)
    admission = Admission(pool, recorder, idempotency, Budgets(redis), LimitStore(redis, config.limits_cache_ttl_s),
                          RateLimiter(redis), config.budget_cost_reserve_usd_per_million_tokens, fairness)
    journal = Journal(redis, peers.gateway_id, config.journal)
    finisher = Finisher(recorder, admission, idempotency, metrics, journal.close_soon)
    dispatcher = Dispatcher(pool, admission, finisher, config.max_attempts, journal)
    sweeper = Sweeper(journal, pool, admission, finisher, idempotency)
    servicer = InferenceServicer(keys, pool, dispatcher)
    exits = contextlib.AsyncExitStack()
    http_port = None
    if config.http_listen is not None:
        http_port = await exits.enter_async_context(serving_http(
            HttpEdge(keys, pool, dispatcher, config.http_max_body_bytes), config.http_listen, config.tls))
    with contextlib.suppress(*UNREACHABLE):
        await journal.renew()  # alive before the first run it journals
    server = await start_server(config.listen, [ServiceSpec(
        pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s))],
        credentials=credentials or (config.tls.credentials() if config.tls else None), serving=False)

    async def on_refresh(is_serving: bool) -> None:
        if fairness is not None:
            fairness.dispatch()  # workers that came up make room
        await server.set_serving(is_serving)
    pool.on_refresh = on_refresh
    await pool.start()
    recorder.start_replaying()
    revocations = asyncio.create_task(keys.watch_revocations())
    sweeping = asyncio.create_task(sweeper.sweep_forever())  # renews this gateway's liveness first
    counting = asyncio.create_task(_count_peers(peers, pool)) if fairness is not None else None
    syncing = asyncio.create_task(shared.sync_forever()) if shared is not None else None
    try:
        yield RunningGateway(server, http_port)
    finally:
        for task in (revocations, counting, syncing, sweeping):
            if task is not None:
                await stop_task(task)
        if counting is not None:
            with contextlib.suppress(*UNREACHABLE):
                await peers.leave()
        await asyncio.gather(server.stop(), exits.aclose())  # both edges finish what they serve
        await dispatcher.drain()
        await recorder.stop()
        with contextlib.suppress(*UNREACHABLE):
            await journal.stop()
        await pool.close()


async def _count_peers(peers: GatewayPeers, pool: WorkerPool, interval_s: float = 1.0) -> None:
    """Keeps the count of gateways per served model current; while Redis is unreachable the last
    counts stand."""
    while True:
        try:
            await peers.beat(sorted(pool.models()))
        except UNREACHABLE:
            pass
        except Exception:  # noqa: BLE001 - one bad beat must not end the count for good
            log.exception("counting the gateway replicas failed (retried in %.1f s)", interval_s)
        await asyncio.sleep(interval_s)


async def serve(config: GatewayConfig, redis_config: RedisConfig) -> None:
    """Serves the gateway until SIGINT or SIGTERM, then stops gracefully (its answered records written)."""
    with resolve_url(redis_config) as url:
        redis = connect(url)
        try:
            async with running_gateway(config, redis) as gateway:
                log.info("gateway listening on port %d%s, workers: %s%s", gateway.port,
                         f" (gRPC) and {gateway.http_port} (HTTP)" if gateway.http_port else "",
                         ", ".join(config.workers) or "none configured",
                         " and those in the registry" if config.registry else "")
                await wait_for_shutdown_signal()
        finally:
            await redis.aclose()
