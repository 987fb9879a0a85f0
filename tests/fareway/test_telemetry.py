"""OpenTelemetry: one request through the gateway leaves a gateway span and a worker span."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fareway.auth import Tenant
from fareway.config import TelemetryConfig
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.telemetry import setup_telemetry
from gateway.tracing import traced_stream
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The process's tracer provider, installed once (OpenTelemetry refuses a second), exporting here."""
    exporter = InMemorySpanExporter()
    setup_telemetry(TelemetryConfig("fareway-test"), [SimpleSpanProcessor(exporter)])
    return exporter


def test_a_request_is_traced_through_gateway_and_worker(stack, exporter) -> None:  # noqa: ANN001
    exporter.clear()
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team, "traced")
    with grpc.insecure_channel(stack.gateway_address) as channel:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            pb.GenerateRequest(model="smollm2-135m-instruct", prompt="Hi",
                               sampling=pb.SamplingParams(max_tokens=2, temperature=0)),
            metadata=(("authorization", f"Bearer {key}"),))
    spans = {span.name: span for span in exporter.get_finished_spans()}
    gateway, worker = spans["gateway.generate"], spans["worker.generate"]
    assert (gateway.attributes["fareway.team"], gateway.attributes["fareway.project"]) == (team, "traced")
    assert gateway.attributes["fareway.completion_tokens"] == 2
    assert worker.attributes["fareway.prompt_tokens"] == gateway.attributes["fareway.prompt_tokens"]
    assert gateway.resource.attributes["service.name"] == "fareway-test"
    # The trace context travels in the worker call's metadata: one trace, the worker's span under the gateway's.
    assert worker.context.trace_id == gateway.context.trace_id and worker.parent is not None
    assert worker.attributes["fareway.worker"] == gateway.attributes["fareway.worker"] == "test-worker"


STREAMS = 12


def test_cancelled_streams_end_their_spans_and_log_no_error(stack, exporter, caplog) -> None:  # noqa: ANN001
    exporter.clear()
    key = stack.create_key(f"t-{uuid.uuid4().hex[:6]}", "traced")
    request = pb.GenerateStreamRequest(model="smollm2-135m-instruct", prompt="Count from one to a thousand:",
                                       sampling=pb.SamplingParams(max_tokens=500, temperature=0))
    with caplog.at_level(logging.WARNING), grpc.insecure_channel(stack.gateway_address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for n in range(STREAMS):
            call = stub.GenerateStream(request, metadata=(("authorization", f"Bearer {key}"),))
            next(call)
            time.sleep(0.01 * n)  # cancelled at a different point of the stream each time
            call.cancel()
        assert wait_until(lambda: len([s for s in exporter.get_finished_spans()
                                       if s.name == "gateway.generate"]) == STREAMS)
        gc.collect()  # an abandoned stream's generator is closed when collected: its span must not mind
        time.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_stream_left_unclosed_ends_its_span_when_collected_without_error(exporter, caplog) -> None:  # noqa: ANN001
    """As grpc.aio leaves a stream whose client cancelled during a send: iteration stops, nobody closes
    the generator, and it is closed when collected, in a task (and Context) of its own."""
    exporter.clear()
    produced_in_span = []

    async def events():  # noqa: ANN202
        for n in range(100):
            await asyncio.sleep(0)
            produced_in_span.append(trace.get_current_span().get_span_context().is_valid)
            yield n

    async def main() -> None:
        async def consume() -> None:
            async for _ in traced_stream(Tenant("t", "p", "k"), pb.GenerateRequest(model="m"), events(),
                                         lambda _: None):
                break  # no aclose
        await asyncio.create_task(consume())
        gc.collect()
        await asyncio.sleep(0.1)  # the collected generator's aclose task runs

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [s.name for s in exporter.get_finished_spans()] == ["gateway.generate"]
    assert produced_in_span == [True]  # the events are made inside the span
