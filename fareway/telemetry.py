"""OpenTelemetry set-up: one tracer provider per process, named after the service."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from fareway.config import TelemetryConfig

_EXPORTERS = {
    "console": ConsoleSpanExporter,
}


def setup_telemetry(config: TelemetryConfig) -> TracerProvider:
    """Installs the global tracer provider; spans are exported only if an exporter is chosen."""
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    exporter = _EXPORTERS.get(config.exporter)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
