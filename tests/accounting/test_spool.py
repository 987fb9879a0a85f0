"""Nothing is lost, nothing counts twice: usage recorded while Redis is down
waits in the spool, survives the gateway being killed, and is replayed once
Redis is back, however often the replay runs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from accounting.exports import Period
from accounting.ledger import Ledger
from accounting.reconcile import reconcile
from accounting.recorder import UsageRecorder
from accounting.records import UsageRecord
from accounting.spool import Spool
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from fareway.redis import connect
from fareway.redis.embedded import EmbeddedRedis
from tests.waiting import wait_serving

pytestmark = pytest.mark.redis_cluster


def usage(request_id: str) -> UsageRecord:
    now = time.time()
    return UsageRecord(
        request_id=request_id, team="search", project="ranking", key_id="k", model="smollm2-135m-instruct",
        worker_id="w", hardware_class="cpu", device_count=1, prompt_tokens=12, cached_tokens=0,
        completion_tokens=4, gpu_seconds=0.25, queue_ms=0, ttft_ms=0, total_ms=0, status="OK",
        finish_reason="stop", started_at=now - 1, ended_at=now)


def test_records_spool_while_redis_is_down_and_replay_exactly_once(tmp_path: Path, redis_url: str,
                                                                    redis_backend: str) -> None:
    spool = Spool(tmp_path / "spool")
    scheme = "redis+cluster" if redis_backend == "cluster" else "redis"

    async def body() -> tuple[int, int, list[UsageRecord]]:
        down = connect(f"{scheme}://127.0.0.1:{free_port()}")  # nothing listens there
        recorder = UsageRecorder(Ledger(down), spool)
        for i in range(3):
            assert await recorder.record(usage(f"r{i}"))
        await down.aclose()
        # A copy of the spool, as if a replay had crashed after writing but before deleting it.
        shutil.copy(spool.path, spool.directory / "usage.spool.copy.replaying")
        with spool.path.open("a") as torn:
            torn.write('{"request_id": "half-writ')  # the writer was killed mid-line
        up = connect(redis_url)
        recorder = UsageRecorder(Ledger(up), spool)
        first = await recorder.replay()
        again = await recorder.replay()
        stored = [r async for r in Ledger(up).records("search")]
        reconciled = (await reconcile(Ledger(up), Period.parse(time.strftime("%Y-%m", time.gmtime())))).ok
        await up.aclose()
        return first, again, stored, reconciled
    first, again, stored, reconciled = asyncio.run(body())
    assert (first, again) == (3, 0) and reconciled
    assert sorted(r.request_id for r in stored) == ["r0", "r1", "r2"]
    assert all(r.price_version and r.cost_nusd > 0 for r in stored), "records are priced on replay"
    assert not spool.has_pending


def _gateway(address: str, worker: str, redis_url: str, spool_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--listen", address,
                                 "--worker", worker, "--spool-dir", str(spool_dir)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def _spooled(spool_dir: Path) -> list[UsageRecord]:
    """Every record waiting in the spool: in the live file, or in one a replay took aside (the
    gateway retries its replay every couple of seconds while Redis is away)."""
    paths = [spool_dir / "usage.spool", *spool_dir.glob("usage.spool.*.replaying")]
    return [record for path in paths if path.exists() for record in Spool.read(path)]


@pytest.mark.slow
def test_a_killed_gateway_and_a_restarted_redis_lose_no_usage(stack, tmp_path: Path) -> None:  # noqa: ANN001
    """Redis stops mid-stream; the request still completes and its usage is spooled; the gateway
    is killed with SIGKILL; Redis comes back from its append-only file; a new gateway replays
    the spool: the ledger holds the request once, with the tokens the caller received."""
    from fareway.auth import KeyStore, Role

    redis_server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    redis_url = redis_server.start()
    spool_dir, log = tmp_path / "spool", tmp_path / "gateway.log"
    address = f"127.0.0.1:{free_port()}"
    gateway = _gateway(address, stack.worker_address, redis_url, spool_dir, log)
    try:
        async def create_key() -> str:
            client = connect(redis_url)
            try:
                return (await KeyStore(client).create("spooled", "main", Role.TENANT))[0]
            finally:
                await client.aclose()
        key = asyncio.run(create_key())
        wait_serving(address)
        # The worker's engine holds after its first two steps until Redis is down, so the request
        # cannot finish (and be recorded) while Redis is still stopping.
        execute, steps, redis_down = stack.worker.runner.execute, [], threading.Event()

        def held_until_redis_is_down(plan):  # noqa: ANN001, ANN202
            steps.append(plan)
            if len(steps) > 2:
                redis_down.wait(timeout=60)
            return execute(plan)
        stack.worker.runner.execute = held_until_redis_is_down
        try:
            with grpc.insecure_channel(address) as channel:
                stream = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(
                    pb.GenerateStreamRequest(model="smollm2-135m-instruct", prompt="1, 2, 3, 4, 5,",
                                             sampling=pb.SamplingParams(max_tokens=40, temperature=0.0)),
                    metadata=(("authorization", f"Bearer {key}"),), timeout=120)
                first = next(stream)
                redis_server.stop()
                redis_down.set()
                rest = list(stream)
        finally:
            redis_down.set()
            stack.worker.runner.execute = execute
        received = [first, *rest]
        assert len(steps) > 2, "the request's steps went through the hold"
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        # The spool file is created a moment before its record is written: wait for the record.
        deadline = time.monotonic() + 10
        while not _spooled(spool_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(timeout=10)
        assert len(_spooled(spool_dir)) == 1, log.read_text()[-3000:]

        redis_server.start()
        gateway = _gateway(address, stack.worker_address, redis_url, spool_dir, log)
        deadline = time.monotonic() + 30
        while Spool(spool_dir).has_pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Spool(spool_dir).has_pending, log.read_text()[-2000:]

        async def stored() -> tuple[list[UsageRecord], bool]:
            client = connect(redis_url)
            try:
                ledger = Ledger(client)
                month = Period.parse(time.strftime("%Y-%m", time.gmtime()))
                return [r async for r in ledger.records("spooled")], (await reconcile(ledger, month)).ok
            finally:
                await client.aclose()
        records, reconciled = asyncio.run(stored())
        assert reconciled
        assert len(records) == 1
        assert records[0].completion_tokens == received[-1].usage.completion_tokens == 40
        assert records[0].cost_nusd > 0 and records[0].status == "OK"
    finally:
        gateway.kill()
        gateway.wait(timeout=10)
        redis_server.stop()
