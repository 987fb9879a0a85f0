"""Workers that cannot be reached or die: failover before the first token,
UNAVAILABLE with the partial usage recorded after it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.redis_store import free_port
from workers.config import WorkerConfig
from workers.model_runner import RunnerConfig
from workers.server import create_worker_server
from workers.worker import Worker
from tests.gateway.fleet import gateway


@pytest.fixture()
def tiny_worker(background_loop, tiny_checkpoint) -> Iterator[tuple[str, object]]:  # noqa: ANN001
    worker = Worker(WorkerConfig(worker_id="tiny-worker",
                                 runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=8 << 20)), tiny_checkpoint)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    yield f"127.0.0.1:{server.port}", server
    background_loop.run(server.stop(0))
    worker.stop()


def gateway_for(background_loop, redis_url: str, workers: tuple[str, ...]):  # noqa: ANN001, ANN201
    return gateway(background_loop, redis_url, workers)


def call(address: str, key: str, request, stream: bool = False):  # noqa: ANN001, ANN201
    channel = grpc.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    metadata = (("authorization", f"Bearer {key}"),)
    return (stub.GenerateStream if stream else stub.Generate)(request, metadata=metadata, timeout=30)


def test_an_unreachable_worker_is_skipped_before_the_first_token(stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    dead = f"127.0.0.1:{free_port()}"
    with gateway_for(background_loop, stack.redis_url, (dead, tiny_worker[0])) as address:
        for _ in range(3):  # whichever worker the rotation tries first
            response = call(address, key, pb.GenerateRequest(
                model="tiny-llama", prompt="hi", sampling=pb.SamplingParams(max_tokens=3, temperature=0)))
            assert response.usage.worker_id == "tiny-worker" and response.usage.completion_tokens == 3
    assert [r.status for r in stack.records(team)] == ["OK"] * 3


def test_no_reachable_worker_is_unavailable_and_leaves_no_record(stack, background_loop) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    with gateway_for(background_loop, stack.redis_url, (f"127.0.0.1:{free_port()}",)) as address:
        with pytest.raises(grpc.RpcError) as caught:
            call(address, key, pb.GenerateRequest(model="tiny-llama", prompt="hi"))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert stack.records(team) == []


def test_a_worker_dying_mid_stream_gives_unavailable_and_records_the_partial_usage(
        stack, background_loop, tiny_worker) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    address, server = tiny_worker
    with gateway_for(background_loop, stack.redis_url, (address,)) as gateway:
        stream = call(gateway, key, pb.GenerateStreamRequest(
            model="tiny-llama", prompt="go on", sampling=pb.SamplingParams(max_tokens=500, temperature=0)), True)
        received = [next(stream) for _ in range(4)]
        background_loop.run(server.stop(0))  # the worker goes away mid-generation
        with pytest.raises(grpc.RpcError) as caught:
            for message in stream:
                received.append(message)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "partial usage was recorded" in caught.value.details()
    streamed = sum(len(m.token_ids) for m in received)
    [record] = stack.records(team)
    assert (record.status, record.finish_reason, record.worker_id) == ("UNAVAILABLE", "error", "tiny-worker")
    assert streamed <= record.completion_tokens < 500 and record.gpu_seconds > 0


def test_a_worker_that_went_away_is_ejected_then_probed_back_in(stack, background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    """The gateway's health follows its workers: NOT_SERVING once the only worker is gone, SERVING
    again (and requests served) once a worker answers at that address again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    key = stack.create_key(f"t-{uuid.uuid4().hex[:6]}")
    address = f"127.0.0.1:{free_port()}"
    request = pb.GenerateRequest(model="tiny-llama", prompt="hi", sampling=pb.SamplingParams(max_tokens=2))

    def start_worker() -> tuple[Worker, object]:
        worker = Worker(WorkerConfig(worker_id="phoenix", runner=RunnerConfig(
            device="cpu", kv_cache_memory_bytes=4 << 20)), tiny_checkpoint)
        return worker, background_loop.run(create_worker_server(worker, address))

    def health(gateway_address: str) -> int:
        with grpc.insecure_channel(gateway_address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def eventually(condition) -> None:  # noqa: ANN001
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)

    worker, server = start_worker()
    with gateway_for(background_loop, stack.redis_url, (address,)) as gateway_address:
        assert call(gateway_address, key, request).usage.worker_id == "phoenix"
        background_loop.run(server.stop(0))
        worker.stop()
        eventually(lambda: health(gateway_address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as refused:
            call(gateway_address, key, request)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        worker, server = start_worker()
        try:
            eventually(lambda: health(gateway_address) == health_pb2.HealthCheckResponse.SERVING)
            assert call(gateway_address, key, request).usage.completion_tokens == 2
        finally:
            background_loop.run(server.stop(0))
            worker.stop()
