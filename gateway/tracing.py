"""The span each generation request gets at the gateway, whichever edge (gRPC or HTTP) it came in by."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TypeVar

from opentelemetry import trace

from fareway.auth import Tenant
from fareway.inference.v1 import inference_pb2 as pb

_tracer = trace.get_tracer(__name__)
T = TypeVar("T")


def _ignore(_: pb.Usage) -> None:
    pass


def _tracing() -> bool:
    """With no tracer provider installed (nothing exports spans: fareway/telemetry.py), not even a
    no-op span is made."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _attributes(tenant: Tenant, request: pb.GenerateRequest | pb.GenerateStreamRequest) -> dict[str, str]:
    return {"fareway.team": tenant.team, "fareway.project": tenant.project, "fareway.model": request.model}


def _describer(span: trace.Span) -> Callable[[pb.Usage], None]:
    return lambda usage: span.set_attributes({
        "fareway.prompt_tokens": usage.prompt_tokens, "fareway.cached_tokens": usage.cached_tokens,
        "fareway.completion_tokens": usage.completion_tokens, "fareway.gpu_seconds": usage.gpu_seconds,
        "fareway.worker": usage.worker_id})


@contextlib.contextmanager
def generate_span(tenant: Tenant, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                  ) -> Iterator[Callable[[pb.Usage], None]]:
    """A `gateway.generate` span naming the request's tenant and model, current around the block; the
    block calls what it is given with the request's usage when it has it. Not for a block that yields
    from an async generator: use `traced_stream`."""
    if not _tracing():
        yield _ignore
        return
    with _tracer.start_as_current_span("gateway.generate") as span:
        if not span.is_recording():
            yield _ignore
            return
        span.set_attributes(_attributes(tenant, request))
        yield _describer(span)


async def traced_stream(tenant: Tenant, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                        events: AsyncGenerator[T, None], usage_of: Callable[[T], pb.Usage | None]) -> AsyncIterator[T]:
    """`events` in a `gateway.generate` span, described with the usage `usage_of` finds in an event.

    The span is current only while `events` makes its next event (so the worker call it makes is the
    span's child), never across a yield: grpc.aio leaves a stream whose client cancelled during a send
    unclosed, and its generator is closed when collected, in another task and Context, where a context
    attached before the yield could not be detached (OpenTelemetry logs "Failed to detach context")."""
    async with contextlib.aclosing(events):
        if not _tracing():
            async for event in events:
                yield event
            return
        span = _tracer.start_span("gateway.generate", attributes=_attributes(tenant, request))
        describe = _describer(span)
        try:
            while True:
                with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        break
                if (usage := usage_of(event)) is not None:
                    describe(usage)
                yield event
        finally:
            span.end()
