"""OpenTelemetry set-up: one tracer provider and one meter provider per process,
named after the service.

Spans go to the console when asked (FAREWAY_TRACES=console) and to a collector
by OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set; metrics go to that
collector too, and are served in Prometheus format on --metrics-port.

With nowhere to send spans (or metrics), the SDK's provider is not installed:
OpenTelemetry's no-op API then costs a request almost nothing, where the SDK
would build and drop every span (several percent of the gateway's CPU per
request).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from fareway.config import TelemetryConfig

log = logging.getLogger(__name__)

_EXPORTERS = {
    "console": ConsoleSpanExporter,
}


def setup_telemetry(config: TelemetryConfig, span_processors: Sequence[SpanProcessor] = ()) -> TracerProvider:
    """Installs the global tracer provider (when spans go somewhere: the configured exporters, or
    `span_processors`) and meter provider (when metrics are read); returns the tracer provider."""
    resource = Resource.create({"service.name": config.service_name})
    provider = TracerProvider(resource=resource)
    processors = list(span_processors)
    exporter = _EXPORTERS.get(config.exporter)
    if exporter is not None:
        processors.append(BatchSpanProcessor(exporter()))
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    for processor in processors:
        provider.add_span_processor(processor)
    if processors:
        trace.set_tracer_provider(provider)
    readers = metric_readers(config)
    if readers:
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    return provider


def metric_readers(config: TelemetryConfig) -> list[MetricReader]:
    readers: list[MetricReader] = []
    if config.metrics_port is not None:
        readers.append(prometheus_reader(config.metrics_port)[0])
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=config.otlp_endpoint)))
    return readers


def prometheus_reader(port: int, address: str = "0.0.0.0") -> tuple[MetricReader, int]:
    """A reader whose metrics are served at http://address:port/metrics, and the port (0 picks one)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=address)  # a daemon thread
    log.info("metrics in Prometheus format on port %d", server.server_port)
    return PrometheusMetricReader(), server.server_port


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
