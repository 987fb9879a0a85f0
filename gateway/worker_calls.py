"""The gateway's two calls to a worker, each one attempt of the failover loop (gateway/failover.py):

- `open_stream` (WorkerService.Generate) for a streamed request: the worker has taken it once its
  first message arrives; one that cannot be reached, or ends the stream before, refuses it.
- `complete` (WorkerService.Complete) for a unary one: the worker answers once, which costs both
  sides less than a stream. The caller has been sent nothing until the answer, so a worker that goes
  away mid-request refuses it too, and the next one runs it (it is billed once, for the run that
  answered). The abort protocol keeps what a stream gave: a caller that goes away or runs out of time
  while the worker runs its request gets `Abort(call_id)` sent for it, and the worker stops the
  request and answers the pending call with what it spent, so that it is billed; a generation that
  fails on the worker comes back with its usage in the status details, billed too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from typing import Any

import grpc
from opentelemetry import propagate, trace

from fareway.errors import DeadlineExceeded, FarewayError, Unavailable, from_rpc_error, status_details
from fareway.inference.v1 import inference_pb2 as pb
from fareway.worker.v1 import worker_pb2 as wpb
from gateway.failover import WorkerRefused
from gateway.pool import WorkerEndpoint
from gateway.run import CallContext, Run

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
# How often a stopped stream's worker is asked whether it has stopped the run yet.
_STOP_POLL_S = 0.02
# The server cancels a call when its deadline passes; allow for the clock read after that.
_DEADLINE_SLACK_S = 0.01


async def open_stream(endpoint: WorkerEndpoint, forwarded: wpb.GenerateRequest, run: Run,
                      context: CallContext) -> grpc.aio.UnaryStreamCall:
    """A stream from the worker that has admitted the request (sent its first message, taken by `run`)."""
    call = endpoint.stub.Generate(forwarded, timeout=context.time_remaining(), metadata=trace_context())
    count_in_flight(endpoint, call)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        if error.code() not in _RETRYABLE:
            raise from_rpc_error(error) from None
        raise WorkerRefused(error.details() or error.code().name, is_down=True) from None
    if first is grpc.aio.EOF:
        raise WorkerRefused("ended the stream without admitting the request", is_down=False)
    run.endpoint = endpoint
    run.add(first)
    return call


class CallIds:
    """Names for unary calls, which an Abort can then name."""

    def __init__(self) -> None:
        # Unique across gateways by the random prefix, and cheaper than a uuid each.
        self._prefix = uuid.uuid4().hex[:16]
        self._numbers = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}-{next(self._numbers)}"


async def complete(endpoint: WorkerEndpoint, forwarded: wpb.GenerateRequest, run: Run,
                   context: CallContext) -> wpb.GenerateResponse:
    """The worker's whole answer, taken by `run`. Raises the caller's error when the generation failed
    after it started (its usage taken by `run`); when the caller goes away meanwhile, the worker is
    told to abort (`forwarded.call_id`) and `run` takes what it spent before the cancellation goes on."""
    remaining = context.time_remaining()
    timeout = None if remaining is None else remaining + _WORKER_DEADLINE_GRACE_S
    # A task of its own, so that the caller going away does not cancel the call before the
    # worker is told to abort it and answers with what it spent.
    answer = asyncio.ensure_future(endpoint.stub.Complete(forwarded, timeout=timeout, metadata=trace_context()))
    count_in_flight(endpoint, answer)
    try:
        message = await asyncio.shield(answer)
    except asyncio.CancelledError:
        run.endpoint = endpoint
        await asyncio.shield(_abort(run, forwarded.call_id, answer))
        raise
    except grpc.aio.AioRpcError as error:
        if (used := spent(error)) is not None:  # it ran, then failed
            run.endpoint = endpoint
            run.add_whole(wpb.GenerateResponse(usage=used))
            raise worker_failure(run, error) from None
        if error.code() not in _RETRYABLE_WHOLE:
            raise from_rpc_error(error) from None
        raise WorkerRefused(error.details() or error.code().name, is_down=True) from None
    run.endpoint = endpoint
    run.add_whole(message)
    return message


async def _abort(run: Run, call_id: str, answer: asyncio.Future[wpb.GenerateResponse]) -> None:
    """The caller went away, or its deadline passed, while a worker ran its request: the worker stops it
    and answers with what it spent, which `run` takes."""
    assert run.endpoint is not None
    try:
        await run.endpoint.stub.Abort(wpb.AbortRequest(call_id=call_id), timeout=_ABORT_TIMEOUT_S)
        async with asyncio.timeout(_ABORT_TIMEOUT_S):
            run.add_whole(await answer)
    except grpc.aio.AioRpcError as error:
        if (used := spent(error)) is not None:
            run.add_whole(wpb.GenerateResponse(usage=used))
        else:
            log.warning("worker %s did not say what aborted request %s spent (%s: %s)", run.endpoint.name,
                        run.request_id, error.code().name, error.details())
    except TimeoutError:
        log.warning("worker %s did not stop aborted request %s within %.0f s", run.endpoint.name,
                    run.request_id, _ABORT_TIMEOUT_S)
    finally:
        answer.cancel()


async def stop_stream(run: Run, call: grpc.aio.UnaryStreamCall) -> None:
    """The caller went away mid-stream: the worker's stream is cancelled (grpc.aio has done so already if
    the caller's task was cancelled while reading it), and `run` takes the worker's account of the run
    once the worker has stopped it (GetRun): the steps it ran after the last message the gateway had
    count too. A worker that cannot say within _ABORT_TIMEOUT_S leaves `run` with what came."""
    assert run.endpoint is not None
    call.cancel()
    try:
        async with asyncio.timeout(_ABORT_TIMEOUT_S):
            while True:
                account = await run.endpoint.stub.GetRun(wpb.GetRunRequest(call_id=run.call_id),
                                                         timeout=_ABORT_TIMEOUT_S)
                if account.state == wpb.GetRunResponse.STATE_FINISHED:
                    run.take_usage(account.response.usage)
                    return
                if account.state != wpb.GetRunResponse.STATE_RUNNING:
                    return
                await asyncio.sleep(_STOP_POLL_S)
    except (TimeoutError, grpc.aio.AioRpcError) as error:
        log.debug("worker %s did not say what stopped stream %s spent: %s", run.endpoint.name, run.request_id,
                  error)


def worker_failure(run: Run, error: grpc.aio.AioRpcError) -> FarewayError:
    """What the caller gets when the worker's generation breaks after the request started."""
    if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the request's deadline passed while generating")
    # Anything else, CANCELLED included (a worker shutting down), is the worker failing.
    worker = run.endpoint.name if run.endpoint else "?"
    return Unavailable(f"worker {worker} failed after {run.usage.completion_tokens} tokens "
                       f"({error.code().name}: {error.details()}); the partial usage was recorded")


def cancelled_status(context: CallContext) -> grpc.StatusCode:
    """How a request the caller stopped waiting for ended: its deadline passed, or it was cancelled."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def spent(error: grpc.aio.AioRpcError) -> pb.Usage | None:
    """What a request that failed on a worker after it started spent, as the worker reported it."""
    return next((d for d in status_details(error) if isinstance(d, pb.Usage)), None)


def count_in_flight(endpoint: WorkerEndpoint, call: asyncio.Future[Any] | grpc.aio.Call) -> None:
    """Counts the call among the worker's requests in flight until it ends, however it ends (what
    routing reads as this gateway's share of the worker's load)."""
    endpoint.num_in_flight += 1

    def ended(_: object) -> None:
        endpoint.num_in_flight -= 1
    call.add_done_callback(ended)


def trace_context() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace context as gRPC metadata, so the worker's span joins the trace."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ()  # no trace to join (nothing exports spans)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
