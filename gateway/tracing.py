"""The span each generation request gets at the gateway, whichever edge (gRPC or HTTP) it came in by."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from opentelemetry import trace

from fareway.auth import Tenant
from fareway.inference.v1 import inference_pb2 as pb

_tracer = trace.get_tracer(__name__)


def _ignore(_: pb.Usage) -> None:
    pass


@contextlib.contextmanager
def generate_span(tenant: Tenant, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                  ) -> Iterator[Callable[[pb.Usage], None]]:
    """A `gateway.generate` span naming the request's tenant and model, around the block; the block calls
    what it is given with the request's usage when it has it. With no tracer provider installed (nothing
    exports spans: fareway/telemetry.py), not even a no-op span."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield _ignore
        return
    with _tracer.start_as_current_span("gateway.generate") as span:
        if not span.is_recording():
            yield _ignore
            return
        span.set_attributes({"fareway.team": tenant.team, "fareway.project": tenant.project,
                             "fareway.model": request.model})
        yield lambda usage: span.set_attributes({
            "fareway.prompt_tokens": usage.prompt_tokens, "fareway.cached_tokens": usage.cached_tokens,
            "fareway.completion_tokens": usage.completion_tokens, "fareway.gpu_seconds": usage.gpu_seconds,
            "fareway.worker": usage.worker_id})
