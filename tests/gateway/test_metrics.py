"""The gateway's metrics: GenAI semantic-convention names, tokens by type,
cost by team, and the Prometheus endpoint that serves them."""

from __future__ import annotations

import contextlib
import urllib.request
import uuid

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.redis import connect
from fareway.telemetry import prometheus_reader
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.service import running_gateway


def points(reader: InMemoryMetricReader) -> dict[str, list]:  # noqa: ANN001
    data = reader.get_metrics_data()
    return {metric.name: list(metric.data.data_points)
            for resource in data.resource_metrics for scope in resource.scope_metrics for metric in scope.metrics}


def test_a_request_feeds_the_genai_metrics_and_prometheus_serves_them(stack, background_loop) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    memory = InMemoryMetricReader()
    prometheus, port = prometheus_reader(0, "127.0.0.1")
    provider = MeterProvider(metric_readers=[memory, prometheus])
    metrics = GatewayMetrics(provider.get_meter("test"))
    exits = contextlib.AsyncExitStack()

    async def start() -> int:
        client = connect(stack.redis_url)
        exits.push_async_callback(client.aclose)
        config = GatewayConfig(workers=(stack.worker_address,), listen="127.0.0.1:0")
        return (await exits.enter_async_context(running_gateway(config, client, metrics=metrics))).port
    gateway = f"127.0.0.1:{background_loop.run(start())}"
    try:
        with grpc.insecure_channel(gateway) as channel:
            response = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(model="smollm2-135m-instruct", prompt="The sky is",
                                   sampling=pb.SamplingParams(max_tokens=4, temperature=0)),
                metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        seen = points(memory)
        mine = {name: [p for p in found if p.attributes.get("fareway.team") == team] for name, found in seen.items()}
        by_type = {p.attributes["gen_ai.token.type"]: p.sum for p in mine["gen_ai.client.token.usage"]}
        assert by_type == {"input": response.usage.prompt_tokens, "output": 4, "cached": response.usage.cached_tokens}
        assert [(p.attributes["fareway.status"], p.value) for p in mine["fareway.requests"]] == [("OK", 1)]
        assert mine["fareway.cost"][0].value > 0 and mine["fareway.gpu_seconds"][0].value > 0
        for name in ("gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
                     "gen_ai.server.time_per_output_token"):
            assert mine[name][0].count == 1, name
        assert any(p.attributes["fareway.worker.state"] == "up" and p.value >= 1 for p in seen["fareway.workers"])
        [worker_up] = [p for p in seen["fareway.worker.up"] if p.attributes["fareway.worker"] == "test-worker"]
        assert worker_up.value == 1
        assert {p.attributes["fareway.sequence.state"] for p in seen["fareway.worker.sequences"]} == {"running",
                                                                                                     "waiting"}
        [kv_usage] = [p.value for p in seen["fareway.worker.kv_usage"] if p.attributes["fareway.worker"] == "test-worker"]
        assert 0 <= kv_usage < 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
        assert "gen_ai_client_token_usage" in text and f'fareway_team="{team}"' in text
        assert key not in text
    finally:
        background_loop.run(exits.aclose())
        provider.shutdown()
