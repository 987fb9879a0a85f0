"""A unary answer goes out while Redis confirms its usage record (write-behind); an idempotent one
waits for its stored outcome; and a gateway shutting down first finishes writing what it answered."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from fareway.inference.v1 import inference_pb2 as pb
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
