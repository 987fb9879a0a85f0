"""One request through the gateway: claim its id, find a worker, stream the
worker's tokens back, and leave exactly one usage record however it ends."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import propagate, trace

from accounting.recorder import UsageRecorder
from accounting.records import UsageRecord
from fareway.auth import Tenant
from fareway.errors import DeadlineExceeded, FarewayError, Internal, Unavailable, from_rpc_error, status_details
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import Hold, Reservation
from fareway.redis import UNREACHABLE
from fareway.validation import HasInput, validate_generate
from fareway.worker.v1 import worker_pb2 as wpb
from gateway.budget_guard import BudgetGuard, max_prompt_tokens
from gateway.config import GatewayConfig
from gateway.fairness import FairScheduler, Slot, estimate_prompt_tokens
from gateway.idempotency import IdempotencyStore, Outcome, replay
from gateway.limit_guard import LimitGuard
from gateway.metrics import GatewayMetrics
from gateway.pool import WorkerEndpoint, WorkerPool
from gateway.routing import Route, route_for

log = logging.getLogger(__name__)

# Worker failures that mean "this worker cannot take it", worth trying the next one.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN})
# A unary caller has been sent nothing, so a worker that went away mid-request (its server
# cancelling the call as it shut down, too) is as good as one that never took it.
_RETRYABLE_WHOLE = _RETRYABLE | {grpc.StatusCode.CANCELLED}
# A worker's call deadline trails the caller's by this much, so that a caller whose deadline passes
# aborts the request and learns what it spent, rather than the worker cancelling it unheard.
_WORKER_DEADLINE_GRACE_S = 5.0
# How long an aborted request's worker has to stop it and answer with its usage.
_ABORT_TIMEOUT_S = 2.0
# The server cancels a call when its deadline passes; allow for the clock read after that.
_DEADLINE_SLACK_S = 0.01
_FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower()
                 for name, value in pb.FinishReason.items()}


@dataclass(frozen=True)
class Delta:
    """New text from the worker."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Final:
    """The whole response; `replayed` when it is a stored outcome of an earlier run."""

    response: pb.GenerateResponse
    replayed: bool = False


@dataclass
class _Run:
    tenant: Tenant
    request: pb.GenerateRequest | pb.GenerateStreamRequest
    request_id: str
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    endpoint: WorkerEndpoint | None = None
    usage: pb.Usage = field(default_factory=pb.Usage)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    stop_sequence: str = ""
    ttft_ms: float = 0.0
    reservation: Reservation | None = None
    hold: Hold | None = None
    slot: Slot | None = None
    """Its place in the model's capacity, when the gateway queues fairly."""
    finishing_behind: bool = False
    """Its record and settlement are written behind its answer (`Dispatcher._finish_answered`)."""
    claimed: bool = False
    """It holds the claim of its request_id (gateway/idempotency.py)."""

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started_monotonic) * 1000.0

    def add(self, message: wpb.GenerateResponse) -> Delta | None:
        self.usage.CopyFrom(message.usage)
        if self.slot is not None:
            self.slot.charge(self.usage.prompt_tokens, self.usage.completion_tokens)
        if message.finish_reason:
            self.finish_reason = message.finish_reason
            self.stop_sequence = message.stop_sequence
        if not (message.text or message.token_ids):
            return None
        if not self.ttft_ms:
            self.ttft_ms = self.elapsed_ms()
        self.text.append(message.text)
        self.token_ids.extend(message.token_ids)
        return Delta(message.text, tuple(message.token_ids))

    def add_whole(self, message: wpb.GenerateResponse) -> None:
        """Takes a whole response (WorkerService.Complete)."""
        self.usage.CopyFrom(message.usage)
        if self.slot is not None:
            self.slot.charge(self.usage.prompt_tokens, self.usage.completion_tokens)
        self.finish_reason, self.stop_sequence = message.finish_reason, message.stop_sequence
        self.text, self.token_ids = [message.text], list(message.token_ids)
        if self.token_ids or message.text:
            # The first token reached the gateway inside the answer: it was ready as long before the answer
            # as the worker spent after it.
            self.ttft_ms = max(0.0, self.elapsed_ms() - (self.usage.total_ms - self.usage.ttft_ms))

    def response(self) -> pb.GenerateResponse:
        usage = pb.Usage()
        usage.CopyFrom(self.usage)
        usage.ttft_ms, usage.total_ms = self.ttft_ms, self.elapsed_ms()
        return pb.GenerateResponse(
            request_id=self.request_id, model=self.request.model, text="".join(self.text),
            token_ids=self.token_ids, finish_reason=self.finish_reason, stop_sequence=self.stop_sequence,
            usage=usage)

    def record(self, status: grpc.StatusCode, finish_reason: int) -> UsageRecord:
        u = self.response().usage
        return UsageRecord(
            request_id=self.request_id, team=self.tenant.team, project=self.tenant.project,
            key_id=self.tenant.key_id, model=self.request.model,
            worker_id=u.worker_id or (self.endpoint.name if self.endpoint else ""),
            hardware_class=u.hardware_class, device_count=u.device_count,
            prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, completion_tokens=u.completion_tokens,
            gpu_seconds=u.gpu_seconds, queue_ms=u.queue_ms, ttft_ms=u.ttft_ms, total_ms=u.total_ms,
            status=status.name, finish_reason=_FINISH_NAMES[finish_reason],
            started_at=self.started_at, ended_at=time.time(), tags=dict(self.request.tags),
            budget_period=self.reservation.month if self.reservation else "")


def _count_in_flight(endpoint: WorkerEndpoint, call: asyncio.Future[Any] | grpc.aio.Call) -> None:
    """Counts the call among the worker's requests in flight until it ends, however it ends (what
    routing reads as this gateway's share of the worker's load)."""
    endpoint.num_in_flight += 1

    def ended(_: object) -> None:
        endpoint.num_in_flight -= 1
    call.add_done_callback(ended)


def _trace_context() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace context as gRPC metadata, so the worker's span joins the trace."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ()  # no trace to join (nothing exports spans)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


def _spent(error: grpc.aio.AioRpcError) -> pb.Usage | None:
    """What a request that failed on a worker after it started spent, as the worker reported it."""
    return next((d for d in status_details(error) if isinstance(d, pb.Usage)), None)


def copy_input(source: HasInput, target: HasInput) -> None:
    """Copies the `input` oneof (a prompt or chat messages) between request types."""
    if source.WhichOneof("input") == "prompt":
        target.prompt = source.prompt
    else:
        target.chat.CopyFrom(source.chat)


def worker_request(request: pb.GenerateRequest | pb.GenerateStreamRequest, request_id: str,
                   tenant: Tenant) -> wpb.GenerateRequest:
    # The team is the prefix cache's privacy boundary: its projects share cached
    # prompts, other teams never see them (unless the worker marks a prefix shared).
    forwarded = wpb.GenerateRequest(request_id=request_id, model=request.model, sampling=request.sampling,
                                    cache_salt=f"team:{tenant.team}")
    copy_input(request, forwarded)
    return forwarded


class Dispatcher:
    def __init__(self, config: GatewayConfig, pool: WorkerPool, recorder: UsageRecorder,
                 idempotency: IdempotencyStore, budget_guard: BudgetGuard, limit_guard: LimitGuard,
                 metrics: GatewayMetrics | None = None, fairness: FairScheduler | None = None) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.pool = pool
        self.recorder = recorder
        self.idempotency = idempotency
        self.budget_guard = budget_guard
        self.limit_guard = limit_guard
        self.fairness = fairness
        self._writing: set[asyncio.Task[None]] = set()
        """Usage records being written behind their answers (`_finish_answered`)."""
        # Worker call ids: unique across gateways by the random prefix, and cheaper than a uuid each.
        self._call_prefix = uuid.uuid4().hex[:16]
        self._call_numbers = itertools.count()

    async def run(self, tenant: Tenant, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                  context: grpc.aio.ServicerContext) -> AsyncIterator[Delta | Final]:
        """Deltas as the worker produces them, then the Final response."""
        validate_generate(request)
        run = _Run(tenant, request, request.request_id or uuid.uuid4().hex)
        try:
            try:
                outcome = await self._claim_and_admit(run, context)
                if outcome is None:
                    await self._wait_turn(run, context)
                    call = await self._open(run, context)
            except BaseException:
                await asyncio.shield(self._never_ran(run))
                raise
            if outcome is not None:
                yield Final(replay(outcome, request.request_id), replayed=True)
                return
            async for event in self._stream(run, call, context):
                yield event
        finally:
            await self._release(run)

    async def complete(self, tenant: Tenant, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        """The whole response, for a caller that waits for it: the worker answers once
        (WorkerService.Complete), which costs both sides less than streaming it."""
        validate_generate(request)
        run = _Run(tenant, request, request.request_id or uuid.uuid4().hex)
        try:
            route = route_for(request, tenant.team)
            try:
                outcome = await self._claim_and_admit(run, context)
                if outcome is None:
                    await self._wait_turn(run, context)
                    await self.pool.learn_route(request.model, route)
            except BaseException:
                await asyncio.shield(self._never_ran(run))
                raise
            if outcome is not None:
                return replay(outcome, request.request_id)
            # Its fair-share counter gets the completion when the answer comes, before the slot frees:
            # the tenants waiting then are weighed against it.
            return await self._complete(run, route, context)
        finally:
            await self._release(run)

    async def _release(self, run: _Run) -> None:
        """However the request ended (a refusal, a worker failure, the caller going away): its tokens
        are settled to what it used and its concurrency slots are freed."""
        if run.slot is not None:
            run.slot.release()
        if run.hold is not None and not run.hold.settled and not run.finishing_behind:
            await asyncio.shield(self.limit_guard.settle(run.hold, run.usage))

    async def _claim_and_admit(self, run: _Run, context: grpc.aio.ServicerContext) -> Outcome | None:
        """Admits the request (`_admit`). One with a request_id claims the id in the same round trip, the
        claim queued first, and the admission scripts count the request only if its run got the claim:
        an id that already ran is replayed, even to a tenant at its limits, and neither counted nor
        charged again; one still running gets ABORTED and counts for nothing either."""
        if not run.request.request_id:
            await self._admit(run, context)
            return None
        owner = f"{self._call_prefix}-{next(self._call_numbers)}"
        claiming = self.idempotency.claim_soon(run.tenant, run.request.request_id, owner)
        claim = (self.idempotency.key(run.tenant, run.request.request_id), owner)
        refused: BaseException | None = None
        counted = False
        try:
            counted = await self._admit(run, context, claim)
        except BaseException as exc:  # noqa: BLE001 - raised below, once the claim is known
            refused = exc
        try:
            outcome = await claiming
        except BaseException:
            if isinstance(refused, asyncio.CancelledError):
                raise refused from None
            raise
        if outcome is None:
            run.claimed = True  # released by `_never_ran` if the request goes no further
            if refused is None and not counted:
                raise Internal("the request's admission reached Redis ahead of its request_id's claim")
        if refused is not None:
            raise refused
        return outcome

    async def _admit(self, run: _Run, context: grpc.aio.ServicerContext,
                     claim: tuple[str, str] | None = None) -> bool:
        """Counts the request against its rate limits, then holds its maximum cost against its budgets
        (RESOURCE_EXHAUSTED past either). With `claim` (its request_id's claim key and this run's owner
        token), nothing is counted unless the run got the claim; whether it was counted."""
        endpoints = self.pool.serving(run.request.model)
        context_length = max((e.info.context_length for e in endpoints if e.info), default=0)
        book = await self.recorder.prices.get()
        # Side by side, so both scripts share one Redis round trip (fareway/redis/batch.py): the budget's
        # is queued at once, the limits' when their (cached) settings are read. What one admitted is
        # undone when the other refuses: the hold is settled and the reservation released as for any
        # request that never ran.
        reserving = self.budget_guard.admit(run.tenant, run.request_id, run.request, book, context_length, claim)
        refused: BaseException | None = None
        try:
            run.hold = await self.limit_guard.admit(run.tenant, run.request_id, run.request, context_length,
                                                    context.time_remaining(), claim)
        except BaseException as exc:  # noqa: BLE001 - raised below, once the reservation is known
            refused = exc
        try:
            run.reservation = await reserving
        except BaseException:
            if refused is None:
                raise
        if refused is not None:  # a rate limit is named before a budget
            raise refused
        return run.hold is not None and run.reservation is not None

    async def _wait_turn(self, run: _Run, context: grpc.aio.ServicerContext) -> None:
        """Past the workers' capacity, waits for the tenant's fair turn (gateway/fairness.py)."""
        if self.fairness is None:
            return
        share = await self.limit_guard.share(run.tenant, self.fairness.config.by_project)
        queue = self.fairness.queue(run.request.model)
        prompt_tokens = estimate_prompt_tokens(max_prompt_tokens(run.request))
        if (slot := queue.try_acquire(share, prompt_tokens)) is not None:
            run.slot = slot  # room, and nobody waiting
            return
        try:
            async with asyncio.timeout(context.time_remaining()):
                run.slot = await queue.acquire(share, prompt_tokens)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited for a worker") from None

    async def _never_ran(self, run: _Run) -> None:
        """Undoes the claims of a request refused before it reached a worker: it leaves no record."""
        if run.reservation is not None:
            await self.budget_guard.budgets.release(run.tenant.team, run.reservation)
        if run.claimed:
            await self.idempotency.release(run.tenant, run.request.request_id)

    async def _open(self, run: _Run, context: grpc.aio.ServicerContext) -> grpc.aio.UnaryStreamCall:
        """A worker call that has admitted the request (sent its first message)."""
        forwarded = worker_request(run.request, run.request_id, run.tenant)
        errors = []
        route = route_for(run.request, run.tenant.team)
        await self.pool.learn_route(run.request.model, route)
        for endpoint in self.pool.candidates(run.request.model, route)[: self.config.max_attempts]:
            call = endpoint.stub.Generate(forwarded, timeout=context.time_remaining(), metadata=_trace_context())
            _count_in_flight(endpoint, call)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRYABLE:
                    raise from_rpc_error(error) from None
                self.pool.mark_down(endpoint)
                errors.append(f"{endpoint.address}: {error.details() or error.code().name}")
                continue
            if first is grpc.aio.EOF:
                errors.append(f"{endpoint.address}: ended the stream without admitting the request")
                continue
            run.endpoint = endpoint
            run.add(first)
            return call
        raise Unavailable(f"no worker for model {run.request.model!r} could take the request "
                          f"({'; '.join(errors) or 'none tried'})")

    async def _complete(self, run: _Run, route: Route, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        """Runs the request on the first worker that takes it and records it; a worker that fails
        without having run it hands it to the next."""
        forwarded = worker_request(run.request, run.request_id, run.tenant)
        forwarded.call_id = f"{self._call_prefix}-{next(self._call_numbers)}"
        remaining = context.time_remaining()
        timeout = None if remaining is None else remaining + _WORKER_DEADLINE_GRACE_S
        errors = []
        for endpoint in self.pool.candidates(run.request.model, route)[: self.config.max_attempts]:
            # A task of its own, so that the caller going away does not cancel the call before the
            # worker is told to abort it and answers with what it spent.
            answer = asyncio.ensure_future(
                endpoint.stub.Complete(forwarded, timeout=timeout, metadata=_trace_context()))
            _count_in_flight(endpoint, answer)
            try:
                message = await asyncio.shield(answer)
            except asyncio.CancelledError:
                run.endpoint = endpoint
                await asyncio.shield(self._abort(run, forwarded.call_id, answer, context))
                raise
            except grpc.aio.AioRpcError as error:
                if (spent := _spent(error)) is not None:  # it ran, then failed
                    run.endpoint = endpoint
                    run.add_whole(wpb.GenerateResponse(usage=spent))
                    failure = self._worker_failure(run, error)
                    await self._finish(run, failure.code, pb.FINISH_REASON_ERROR, None, failure.message)
                    raise failure from None
                if error.code() not in _RETRYABLE_WHOLE:
                    await asyncio.shield(self._never_ran(run))
                    raise from_rpc_error(error) from None
                self.pool.mark_down(endpoint)
                errors.append(f"{endpoint.address}: {error.details() or error.code().name}")
                continue
            run.endpoint = endpoint
            run.add_whole(message)
            response = run.response()
            await self._finish_answered(run, response)
            return response
        await asyncio.shield(self._never_ran(run))
        raise Unavailable(f"no worker for model {run.request.model!r} could take the request "
                          f"({'; '.join(errors) or 'none tried'})")

    async def _abort(self, run: _Run, call_id: str, answer: asyncio.Future[wpb.GenerateResponse],
                     context: grpc.aio.ServicerContext) -> None:
        """The caller went away, or its deadline passed, while a worker ran its request: the worker stops
        it and answers with what it spent, which is recorded."""
        assert run.endpoint is not None
        try:
            await run.endpoint.stub.Abort(wpb.AbortRequest(call_id=call_id), timeout=_ABORT_TIMEOUT_S)
            async with asyncio.timeout(_ABORT_TIMEOUT_S):
                run.add_whole(await answer)
        except grpc.aio.AioRpcError as error:
            if (spent := _spent(error)) is not None:
                run.add_whole(wpb.GenerateResponse(usage=spent))
            else:
                log.warning("worker %s did not say what aborted request %s spent (%s: %s)", run.endpoint.name,
                            run.request_id, error.code().name, error.details())
        except TimeoutError:
            log.warning("worker %s did not stop aborted request %s within %.0f s", run.endpoint.name,
                        run.request_id, _ABORT_TIMEOUT_S)
        finally:
            answer.cancel()
        status = grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
        await self._finish(run, status, pb.FINISH_REASON_CANCELLED, None)

    async def _stream(self, run: _Run, call: grpc.aio.UnaryStreamCall,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Delta | Final]:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                delta = run.add(message)
                if delta is not None:
                    yield delta
        except asyncio.CancelledError:
            call.cancel()
            status = grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
            await asyncio.shield(self._finish(run, status, pb.FINISH_REASON_CANCELLED, None))
            raise
        except grpc.aio.AioRpcError as error:
            failure = self._worker_failure(run, error)
            reason = pb.FINISH_REASON_CANCELLED if isinstance(failure, DeadlineExceeded) else pb.FINISH_REASON_ERROR
            await asyncio.shield(self._finish(run, failure.code, reason, None, failure.message))
            raise failure from None
        response = run.response()
        await self._finish_answered(run, response)
        yield Final(response)

    def _worker_failure(self, run: _Run, error: grpc.aio.AioRpcError) -> FarewayError:
        """What the caller gets when the worker's stream breaks after the request started."""
        if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded("the request's deadline passed while generating")
        # Anything else, CANCELLED included (a worker shutting down), is the worker failing.
        worker = run.endpoint.name if run.endpoint else "?"
        return Unavailable(f"worker {worker} failed after {run.usage.completion_tokens} tokens "
                           f"({error.code().name}: {error.details()}); the partial usage was recorded")

    async def _finish(self, run: _Run, status: grpc.StatusCode, finish_reason: int,
                      response: pb.GenerateResponse | None, message: str = "") -> None:
        """Writes the usage record (spooled if Redis is down) and settles the request's limits, in one
        round trip; then the idempotency outcome."""
        await self._finish_soon(run, status, finish_reason, response, message)

    def _finish_soon(self, run: _Run, status: grpc.StatusCode, finish_reason: int,
                     response: pb.GenerateResponse | None, message: str = "") -> Coroutine[Any, Any, None]:
        """`_finish`, with the settlement and the usage record queued before this returns (one round trip,
        which nothing queued later can overtake). Await what it returns."""
        settling = self.limit_guard.settle_soon(run.hold, run.usage) if run.hold is not None else None
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
        return self._finished(run, settling, recording, metered, completing)

    async def _finished(self, run: _Run, settling: Awaitable[None] | None, recording: Awaitable[UsageRecord],
                        metered: bool, completing: Awaitable[Any] | None) -> None:
        try:
            priced = await recording
        finally:
            if settling is not None:
                await settling
            if completing is not None:
                try:
                    await completing
                except UNREACHABLE as exc:
                    # The usage is safe in the spool; a retry of this id waits out the claim's lease.
                    log.warning("could not store the outcome of request_id %s: %s", run.request.request_id, exc)
        if not metered:
            self.metrics.finished(priced)

    async def _finish_answered(self, run: _Run, response: pb.GenerateResponse) -> None:
        """Finishes a request that succeeded, before its caller has the answer only where it must.

        Write-behind: the record and the settlement are queued on the loop's next turn, once gRPC has the
        answer on its way, and the answer does not wait for Redis to confirm them (a Redis round trip and
        the record's pricing and encoding less on every request's latency; a failed write is spooled as
        ever, and `drain` waits for them on shutdown). They still reach Redis ahead of anything queued for a
        request sent after this answer: that request is read from its socket on a later turn. The
        answer waits where that matters: for a request with a request_id (a retry of it must find its
        outcome stored), and while Redis is unreachable (the record is in the spool, on disk, before the
        answer goes).
        """
        if run.request.request_id or self.recorder.unreachable:
            await self._finish_soon(run, grpc.StatusCode.OK, run.finish_reason, response)
            return
        run.finishing_behind = True
        task = asyncio.ensure_future(self._finish_behind(run, response))
        self._writing.add(task)
        task.add_done_callback(self._written)

    async def _finish_behind(self, run: _Run, response: pb.GenerateResponse) -> None:
        await self._finish_soon(run, grpc.StatusCode.OK, run.finish_reason, response)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("the usage record of a request could not be written (no spool to keep it)",
                      exc_info=error)

    async def drain(self) -> None:
        """Waits for the usage records still being written behind their answers."""
        while self._writing:
            await asyncio.wait(list(self._writing))
