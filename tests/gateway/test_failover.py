"""Workers that cannot be reached or die: failover before the first token,
UNAVAILABLE with the partial usage recorded after it."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from tests.gateway.fleet import gateway
from workers.config import RunnerConfig, WorkerConfig
from workers.server import create_worker_server
from workers.worker import Worker


@contextlib.contextmanager
def serving_worker(background_loop, checkpoint, worker_id: str) -> Iterator[tuple[str, object, Worker]]:  # noqa: ANN001
    worker = Worker(WorkerConfig(worker_id=worker_id,
                                 runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=8 << 20)), checkpoint)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    try:
        yield f"127.0.0.1:{server.port}", server, worker
    finally:
        background_loop.run(server.stop(0))
        worker.stop()


@pytest.fixture()
def tiny_worker(background_loop, tiny_checkpoint) -> Iterator[tuple[str, object]]:  # noqa: ANN001
    with serving_worker(background_loop, tiny_checkpoint, "tiny-worker") as (address, server, _):
        yield address, server


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


def test_a_unary_request_whose_worker_dies_mid_generation_is_rerun_on_another(
        stack, background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    """A unary caller has been sent nothing yet, so the request runs again elsewhere and is billed once."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    with serving_worker(background_loop, tiny_checkpoint, "first") as first, \
            serving_worker(background_loop, tiny_checkpoint, "second") as second, \
            gateway_for(background_loop, stack.redis_url, (first[0], second[0])) as address:
        request = pb.GenerateRequest(model="tiny-llama", prompt="go on",
                                     sampling=pb.SamplingParams(max_tokens=1000, temperature=0))
        answer: list = []
        caller = threading.Thread(target=lambda: answer.append(call(address, key, request)))
        caller.start()
        deadline = time.monotonic() + 10
        while not (running := [w for w in (first, second) if w[2].engine.load().num_running]):
            assert time.monotonic() < deadline, "the request never reached a worker"
            time.sleep(0.01)
        [(_, server, dying)] = running
        background_loop.run(server.stop(0))
        caller.join(30)
    [response] = answer
    survivor = "second" if dying.worker_id == "first" else "first"
    assert response.usage.worker_id == survivor and response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    [record] = stack.records(team)
    assert (record.status, record.worker_id, record.completion_tokens) == (
        "OK", survivor, response.usage.completion_tokens)


def test_a_generation_failing_on_the_worker_is_unavailable_with_its_partial_usage(
        stack, background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    """The worker reports what a failed generation spent (a Usage in the status details), and that is
    what the tenant is billed; the failure is not retried, the worker having run it."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    with serving_worker(background_loop, tiny_checkpoint, "flaky") as (worker_address, _, worker), \
            gateway_for(background_loop, stack.redis_url, (worker_address,)) as address:
        execute, steps = worker.runner.execute, []

        def failing_on_the_fifth_step(plan):  # noqa: ANN001, ANN202
            steps.append(plan)
            if len(steps) == 5:
                raise RuntimeError("device lost")
            return execute(plan)
        worker.runner.execute = failing_on_the_fifth_step
        with pytest.raises(grpc.RpcError) as caught:
            call(address, key, pb.GenerateRequest(model="tiny-llama", prompt="go on",
                                                  sampling=pb.SamplingParams(max_tokens=50, temperature=0)))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "worker flaky failed after 4 tokens" in caught.value.details()
    assert "partial usage was recorded" in caught.value.details()
    [record] = stack.records(team)
    assert (record.status, record.finish_reason, record.worker_id) == ("UNAVAILABLE", "error", "flaky")
    assert record.completion_tokens == 4 and record.prompt_tokens > 0 and record.gpu_seconds > 0


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
