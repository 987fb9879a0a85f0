"""Exactly once through kill -9: a gateway killed mid-stream and mid-request leaves the runs it sent to the
worker in its journal, and the gateway left standing settles each from the worker's own account: one
record with the tokens the worker produced, the rate-limit slots and budget reservation released, and the
request_id's outcome stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from fareway.quota import Budget, Budgets, Limits, LimitStore
from fareway.redis import connect, keys
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc
from tests.waiting import wait_serving, wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
LONG = pb.SamplingParams(max_tokens=400, temperature=0.0)
COUNTING = "Count from one to five hundred, in words: one, two, three,"


def gateway_process(address: str, worker: str, redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--listen", address, "--worker", worker,
                                 "--no-registry", "--journal-ttl", "2", "--journal-sweep-interval", "0.5"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def test_a_gateway_killed_mid_stream_and_mid_request_leaves_exactly_one_record_each(
        stack, tmp_path: Path) -> None:  # noqa: ANN001
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    auth = (("authorization", f"Bearer {key}"),)

    async def limits_and_budget() -> None:
        client = connect(stack.redis_url)
        try:
            await LimitStore(client).set(Limits(team, max_concurrent_requests=4))
            await Budgets(client).set(Budget(team, hard_usd=100.0))
        finally:
            await client.aclose()
    stack.loop.run(limits_and_budget())

    killed_log, survivor_log = tmp_path / "killed.log", tmp_path / "survivor.log"
    killed_address, survivor_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    killed = gateway_process(killed_address, stack.worker_address, stack.redis_url, killed_log)
    survivor = gateway_process(survivor_address, stack.worker_address, stack.redis_url, survivor_log)
    try:
        wait_serving(killed_address)
        wait_serving(survivor_address)
        with grpc.insecure_channel(killed_address) as channel, grpc.insecure_channel(stack.worker_address) as w:
            gateway = inference_pb2_grpc.InferenceServiceStub(channel)
            worker = worker_pb2_grpc.WorkerServiceStub(w)
            stream = gateway.GenerateStream(pb.GenerateStreamRequest(model=MODEL, prompt=COUNTING, sampling=LONG,
                                                                     request_id="streamed-1"), metadata=auth)
            streamed = [next(stream) for _ in range(4)]
            unary_error: list[grpc.RpcError] = []

            def unary() -> None:
                try:
                    gateway.Generate(pb.GenerateRequest(model=MODEL, prompt=COUNTING, sampling=LONG,
                                                        request_id="unary-1"), metadata=auth)
                except grpc.RpcError as error:
                    unary_error.append(error)
            asking = threading.Thread(target=unary)
            asking.start()
            assert wait_until(lambda: worker.GetLoad(wpb.GetLoadRequest()).num_running == 2)
            time.sleep(0.3)  # a few tokens into the unary request
            killed.send_signal(signal.SIGKILL)
            killed.wait(timeout=10)
            asking.join(timeout=30)
            with pytest.raises(grpc.RpcError):
                list(stream)
        assert unary_error and unary_error[0].code() is grpc.StatusCode.UNAVAILABLE

        # The worker stops both runs (their caller is gone); the survivor settles them from its account.
        assert wait_until(lambda: len(stack.records(team)) == 2, timeout=30), survivor_log.read_text()[-3000:]
        time.sleep(1.5)  # more sweeps: still exactly one record each
        records = {r.request_id: r for r in stack.records(team)}
        assert sorted(records) == ["streamed-1", "unary-1"]
        for record in records.values():
            assert (record.status, record.finish_reason) == ("CANCELLED", "cancelled")
            assert 0 < record.completion_tokens < LONG.max_tokens and record.gpu_seconds > 0 and record.cost_nusd > 0
            assert record.prompt_tokens == len(stack.worker.tokenizer.encode(COUNTING))
        # The stream's caller got some of the tokens the worker produced; none went unbilled.
        assert records["streamed-1"].completion_tokens >= sum(len(m.token_ids) for m in streamed)

        plain = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        try:
            assert plain.zcard(keys.inflight(team, "team")) == 0, "a concurrency slot outlived its run"
            assert plain.hgetall(keys.reservations(team)) == {}, "a budget reservation outlived its run"
            # The killed gateway's journal (the one whose liveness lapsed) is swept clean.
            assert wait_until(lambda: not any(plain.hlen(keys.gateway_journal(g))
                                              for g in plain.smembers(keys.JOURNALED_GATEWAYS)
                                              if not plain.exists(keys.gateway_alive(g))))
        finally:
            plain.close()

        # A retry of a request_id is told what became of it, and is not run or billed again.
        with grpc.insecure_channel(survivor_address) as channel:
            with pytest.raises(grpc.RpcError) as retried:
                inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                    pb.GenerateRequest(model=MODEL, prompt=COUNTING, sampling=LONG, request_id="unary-1"),
                    metadata=auth)
        assert retried.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "stopped before it answered" in retried.value.details()
        assert len(stack.records(team)) == 2
    finally:
        for process in (killed, survivor):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_a_journaled_run_no_worker_knows_is_released_without_a_record(stack) -> None:  # noqa: ANN001
    """A run its gateway journaled but that never reached a worker (the gateway died on the way): once
    every worker serving its model says it does not know it, what its admission took is given back."""
    from gateway.journal import Entry

    team, gone = f"t-{uuid.uuid4().hex[:6]}", f"gone-{uuid.uuid4().hex[:6]}"
    entry = Entry(team, "main", "k", "lost-1", "lost-1", MODEL, {}, time.time() - 60, None, None, claimed=True)
    plain = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        plain.hset(keys.request_id_claim(team, "main", "lost-1"), mapping={"state": "running", "owner": "x"})
        plain.sadd(keys.JOURNALED_GATEWAYS, gone)
        plain.hset(keys.gateway_journal(gone), "call-never-sent", entry.to_json())
        # The stack's own gateway sweeps every few seconds.
        assert wait_until(lambda: not plain.exists(keys.gateway_journal(gone)), timeout=20)
        assert not plain.exists(keys.request_id_claim(team, "main", "lost-1")), "the claim outlived the run"
        assert wait_until(lambda: not plain.sismember(keys.JOURNALED_GATEWAYS, gone), timeout=20)
    finally:
        plain.close()
    assert stack.records(team) == []
