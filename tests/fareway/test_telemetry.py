"""OpenTelemetry: one request through the gateway leaves a gateway span and a worker span."""

from __future__ import annotations

import uuid

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fareway.config import TelemetryConfig
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.telemetry import setup_telemetry

pytestmark = pytest.mark.slow


def test_a_request_is_traced_through_gateway_and_worker(stack) -> None:  # noqa: ANN001
    exporter = InMemorySpanExporter()
    setup_telemetry(TelemetryConfig("fareway-test"), [SimpleSpanProcessor(exporter)])
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
