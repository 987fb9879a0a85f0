"""Finishing a request that reached a worker: exactly one usage record, however it ended, written with
the settlement of its limits and (for a request_id) its outcome, in one Redis round trip.

Write-behind: a request that succeeded has its record and settlement queued on the loop's next turn,
once gRPC has the answer on its way, and the answer does not wait for Redis to confirm them (a Redis
round trip, and the record's pricing and encoding, less on every request's latency; a failed write
is spooled as ever, and `drain` waits for them on shutdown). They still reach Redis ahead of anything
queued for a request sent after this answer: that request is read from its socket on a later turn.
The answer waits where that matters: for a request with a request_id (a retry of it must find its
outcome stored), and while Redis is unreachable (the record is in the spool, on disk, before the
answer goes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc

from accounting.recorder import UsageRecord, UsageRecorder
from fareway.inference.v1 import inference_pb2 as pb
from fareway.redis import UNREACHABLE
from gateway.admission import Admission
from gateway.idempotency import IdempotencyStore, Outcome
from gateway.metrics import GatewayMetrics
from gateway.run import Run

log = logging.getLogger(__name__)


class Finisher:
    def __init__(self, recorder: UsageRecorder, admission: Admission, idempotency: IdempotencyStore,
                 metrics: GatewayMetrics, recorded: Callable[[Run], None] | None = None) -> None:
        self.recorder = recorder
        self.admission = admission
        self.idempotency = idempotency
        self.metrics = metrics
        self.recorded = recorded
        """Called with each run once its record is written or spooled (its journal entry goes then:
        gateway/journal.py)."""
        self._writing: set[asyncio.Task[None]] = set()
        """Usage records being written behind their answers."""

    def finish(self, run: Run, status: grpc.StatusCode, finish_reason: int, response: pb.GenerateResponse | None,
               message: str = "") -> Coroutine[Any, Any, None]:
        """Queues the request's settlement, its usage record (spooled if Redis is down) and its request_id's
        outcome before this returns (one round trip, which nothing queued later can overtake). Await what
        it returns: it ends when Redis (or the spool) has them."""
        settling = self.admission.settle_soon(run) if run.hold is not None else None
        record = run.record(status, finish_reason)
        if (priced := self.recorder.priced_now(record)) is None:  # the price book is read first
            recording, metered = self.recorder.record(record), False
        else:
            self.metrics.finished(priced)  # as it is queued: the spool keeps it if Redis cannot take it
            recording, metered = self.recorder.write_soon(priced), True
        # The outcome of a request_id in the same round trip, after its record.
        completing = (self.idempotency.complete_soon(run.tenant, run.request.request_id,
                                                     Outcome(status, message, response))
                      if run.request.request_id else None)
        return self._confirmed(run, settling, recording, None if metered else self.metrics, completing)

    async def _confirmed(self, run: Run, settling: Awaitable[None] | None, recording: Awaitable[UsageRecord],
                         metrics: GatewayMetrics | None, completing: Awaitable[Any] | None) -> None:
        try:
            priced = await recording
            if self.recorded is not None:
                # Out of the journal once the record is written (or spooled), not before: on a Redis Cluster
                # the two keys live on different nodes, and a batch keeps its order only within a node.
                self.recorded(run)
        finally:
            if settling is not None:
                await settling
            if completing is not None:
                try:
                    await completing
                except UNREACHABLE as exc:
                    # The usage is safe in the spool; a retry of this id waits out the claim's lease.
                    log.warning("could not store the outcome of request_id %s: %s", run.request.request_id, exc)
        if metrics is not None:
            metrics.finished(priced)

    async def finish_answered(self, run: Run, response: pb.GenerateResponse) -> None:
        """Finishes a request that succeeded, behind its answer where it may (see the module's docstring)."""
        if run.request.request_id or self.recorder.unreachable:
            await self.finish(run, grpc.StatusCode.OK, run.finish_reason, response)
            return
        run.finishing_behind = True
        task = asyncio.ensure_future(self._behind(run, response))
        self._writing.add(task)
        task.add_done_callback(self._written)

    async def _behind(self, run: Run, response: pb.GenerateResponse) -> None:
        # A task's body starts on the loop's next turn: the answer has gone to gRPC by then.
        await self.finish(run, grpc.StatusCode.OK, run.finish_reason, response)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("the usage record of a request could not be written (no spool to keep it)", exc_info=error)

    async def drain(self) -> None:
        """Waits for the usage records still being written behind their answers."""
        while self._writing:
            await asyncio.wait(list(self._writing))

