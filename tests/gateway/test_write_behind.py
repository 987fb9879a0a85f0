"""A unary answer goes out while Redis confirms its usage record (write-behind); an idempotent one
waits for its stored outcome; and a gateway shutting down first finishes writing what it answered."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
import uuid

import redis

from accounting.ledger import Ledger
from accounting.recorder import UsageRecorder
from accounting.records import UsageRecord
from accounting.spool import Spool
from fareway.inference.v1 import inference_pb2 as pb
from fareway.net import free_port
from fareway.redis import connect
from fareway.redis.embedded import EmbeddedRedis
from tests.gateway.fleet import create_key, gateway
from tests.gateway.test_failover import call, gateway_for, serving_worker

PAUSE_S = 3.0


def paused_while_answering(stack, background_loop, tiny_checkpoint, request_id: str = "") -> tuple[float, int]:  # noqa: ANN001
    """Seconds until the caller had its answer, with Redis refusing writes for PAUSE_S from the moment the
    worker took the request; and how many usage records the team had once the gateway had stopped."""
    team = f"t-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team)
    admin = redis.Redis.from_url(stack.redis_url)
    with serving_worker(background_loop, tiny_checkpoint, "w") as (worker_address, _, worker), \
            gateway_for(background_loop, stack.redis_url, (worker_address,)) as address:
        answered: list[float] = []

        def ask() -> None:
            call(address, key, pb.GenerateRequest(model="tiny-llama", prompt="go on", request_id=request_id,
                                                  sampling=pb.SamplingParams(max_tokens=40, temperature=0)))
            answered.append(time.monotonic())
        caller = threading.Thread(target=ask)
        caller.start()
        deadline = time.monotonic() + 10
        while not worker.engine.load().num_running:
            assert time.monotonic() < deadline, "the request never reached the worker"
            time.sleep(0.002)
        paused_at = time.monotonic()
        admin.execute_command("CLIENT", "PAUSE", int(PAUSE_S * 1000), "WRITE")
        caller.join(30)
        # Leaving the block stops the gateway at once, maybe before Redis takes writes again.
    num_records = len(stack.records(team))
    admin.close()
    return answered[0] - paused_at, num_records


def test_the_answer_does_not_wait_for_its_record_and_a_stopping_gateway_still_writes_it(
        stack, background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    waited_s, num_records = paused_while_answering(stack, background_loop, tiny_checkpoint)
    assert 0 < waited_s < PAUSE_S - 1.0, "the answer waited for Redis to take its usage record"
    assert num_records == 1


def test_an_idempotent_answer_waits_until_its_outcome_is_stored(stack, background_loop, tiny_checkpoint) -> None:  # noqa: ANN001
    waited_s, num_records = paused_while_answering(stack, background_loop, tiny_checkpoint, request_id="job-1")
    assert waited_s >= PAUSE_S * 0.9, "a retry of the request_id could have found no outcome"
    assert num_records == 1


def test_a_stalled_redis_sends_the_record_to_the_spool_and_lets_the_gateway_stop(
        background_loop, tiny_checkpoint, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Redis stops answering (its process paused) while a request runs: the caller has its answer, the
    record's write gives up after the clients' default socket timeout (1 s here) and goes to the spool, and the gateway
    stops instead of waiting on Redis for ever. Once Redis is back, the record is stored once."""
    spool_dir = tmp_path / "spool"
    with EmbeddedRedis(tmp_path / "redis", port=free_port()) as server:
        monkeypatch.setattr("fareway.redis.SOCKET_TIMEOUT_S", 1.0)
        url = server.url
        team = f"t-{uuid.uuid4().hex[:6]}"
        key = create_key(background_loop, url, team)
        stopped = threading.Event()
        try:
            with serving_worker(background_loop, tiny_checkpoint, "w") as (worker_address, _, worker):
                execute, steps, paused = worker.runner.execute, [], threading.Event()

                def held_until_redis_is_paused(plan):  # noqa: ANN001, ANN202
                    steps.append(plan)
                    if len(steps) > 2:
                        paused.wait(timeout=30)
                    return execute(plan)
                worker.runner.execute = held_until_redis_is_paused
                blocks = contextlib.ExitStack()
                address = blocks.enter_context(gateway(background_loop, url, (worker_address,), spool_dir=spool_dir))
                caller = concurrent.futures.ThreadPoolExecutor(1)
                answer = caller.submit(call, address, key, pb.GenerateRequest(
                    model="tiny-llama", prompt="go on", sampling=pb.SamplingParams(max_tokens=20, temperature=0)))
                deadline = time.monotonic() + 10
                while len(steps) < 3:
                    assert time.monotonic() < deadline, "the request never reached the worker"
                    time.sleep(0.002)
                os.kill(server.pid, signal.SIGSTOP)
                paused.set()
                assert answer.result(timeout=30).usage.completion_tokens == 20
                caller.shutdown()
                stopping = threading.Thread(target=lambda: (blocks.close(), stopped.set()), daemon=True)
                stopping.start()
                stopping.join(timeout=15)
                assert stopped.is_set(), "the gateway did not stop while Redis was stalled"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        spooled = [record for path in [spool_dir / "usage.spool", *spool_dir.glob("usage.spool.*.replaying")]
                   if path.exists() for record in Spool.read(path)]
        assert [(r.team, r.completion_tokens) for r in spooled] == [(team, 20)]

        async def replayed() -> tuple[int, list[UsageRecord]]:
            client = connect(server.url)
            try:
                added = await UsageRecorder(Ledger(client), Spool(spool_dir)).replay()
                return added, [r async for r in Ledger(client).records(team)]
            finally:
                await client.aclose()
        added, stored = background_loop.run(replayed())
        # Redis, woken, may run the write it was sent before it stalled: the replay then finds the record.
        assert added <= 1 and [r.completion_tokens for r in stored] == [20]
