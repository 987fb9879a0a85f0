"""While Redis is away the gateway cannot admit a request (its limits and budgets are there): callers
get UNAVAILABLE saying so, at once, not an internal error; once Redis is back, requests are served."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from fareway.inference.v1 import inference_pb2 as pb
from fareway.net import free_port
from fareway.redis.embedded import EmbeddedRedis
from tests.gateway.fleet import create_key, gateway
from tests.gateway.test_failover import call, serving_worker


def test_requests_while_redis_is_away_are_unavailable_and_served_once_it_is_back(
        background_loop, tiny_checkpoint, tmp_path) -> None:  # noqa: ANN001
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    try:
        key = create_key(background_loop, server.url, f"t-{uuid.uuid4().hex[:6]}")
        request = pb.GenerateRequest(model="tiny-llama", prompt="hi",
                                     sampling=pb.SamplingParams(max_tokens=2, temperature=0))
        with serving_worker(background_loop, tiny_checkpoint, "w") as (worker_address, _, _), \
                gateway(background_loop, server.url, (worker_address,), spool_dir=tmp_path / "spool") as address:
            assert call(address, key, request).usage.completion_tokens == 2
            server.stop()
            for stream in (False, True):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    response = call(address, key, request, stream=stream)
                    if stream:
                        list(response)
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
                assert "Redis" in caught.value.details() and "unreachable" in caught.value.details()
                assert time.monotonic() - started < 5.0
            server.start()
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert call(address, key, request).usage.completion_tokens == 2
                    break
                except grpc.RpcError as error:
                    assert error.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.2)
    finally:
        server.stop()
