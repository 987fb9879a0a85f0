"""One request through the gateway: admit it (gateway/admission.py), give it to the first worker that
takes it (gateway/failover.py, gateway/worker_calls.py), send back what the worker answers, and leave
exactly one usage record however it ends (gateway/finishing.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from functools import partial

import grpc

from fareway.auth import Tenant
from fareway.errors import DeadlineExceeded, FarewayError
from fareway.inference.v1 import inference_pb2 as pb
from fareway.validation import validate_generate
from gateway.admission import Admission
from gateway.failover import Failover
from gateway.finishing import Finisher
from gateway.idempotency import Outcome, replay
from gateway.journal import Journal
from gateway.pool import WorkerPool
from gateway.routing import Route, route_for
from gateway.run import CallContext, Delta, Final, Run, worker_request
from gateway.worker_calls import CallIds, cancelled_status, complete, open_stream, stop_stream, worker_failure


class Dispatcher:
    def __init__(self, pool: WorkerPool, admission: Admission, finisher: Finisher, max_attempts: int,
                 journal: Journal) -> None:
        self.pool = pool
        self.admission = admission
        self.finisher = finisher
        self.failover = Failover(pool, max_attempts)
        self.journal = journal
        self._call_ids = CallIds()

    async def run(self, tenant: Tenant, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                  context: CallContext, run_id: str = "") -> AsyncIterator[Delta | Final]:
        """Deltas as the worker produces them, then the Final response. The run is named by the request's
        request_id, else by `run_id`, else by a new id."""
        validate_generate(request)
        run = Run(tenant, request, request.request_id or run_id or uuid.uuid4().hex, call_id=self._call_ids.next())
        try:
            route = route_for(request, tenant.team)
            try:
                outcome = await self._admitted(run, route, context)
                if outcome is None:
                    await self.journal.open(run)
                    call = await self.failover.first(request.model, route,
                                                     partial(open_stream, forwarded=worker_request(run), run=run,
                                                             context=context))
            except BaseException:
                await self._undo_unless_ran(run)
                raise
            if outcome is not None:
                yield Final(replay(outcome, request.request_id), replayed=True)
                return
            async with contextlib.aclosing(self._stream(run, call, context)) as events:
                async for event in events:
                    yield event
        finally:
            await self.admission.release(run)

    async def complete(self, tenant: Tenant, request: pb.GenerateRequest,
                       context: CallContext, run_id: str = "") -> pb.GenerateResponse:
        """The whole response, for a caller that waits for it: the worker answers once
        (WorkerService.Complete), which costs both sides less than streaming it. Named as `run`'s."""
        validate_generate(request)
        run = Run(tenant, request, request.request_id or run_id or uuid.uuid4().hex, call_id=self._call_ids.next())
        try:
            route = route_for(request, tenant.team)
            try:
                outcome = await self._admitted(run, route, context)
                if outcome is None:
                    forwarded = worker_request(run)
                    await self.journal.open(run)
                    await self.failover.first(request.model, route,
                                              partial(complete, forwarded=forwarded, run=run, context=context))
            except BaseException as error:
                await self._ran_or_undo(run, error, context)
                raise
            if outcome is not None:
                return replay(outcome, request.request_id)
            # Its fair-share counter has the completion now, before the slot frees: the tenants waiting
            # then are weighed against it.
            response = run.response()
            await self.finisher.finish_answered(run, response)
            return response
        finally:
            await self.admission.release(run)

    async def _ran_or_undo(self, run: Run, error: BaseException, context: CallContext) -> None:
        """A unary request that failed: billed for what ran if a worker ran it (the worker said what it
        spent: the caller went away and it was aborted, or its generation failed), else undone."""
        if run.endpoint is None:
            await self._undo_unless_ran(run)
        elif isinstance(error, asyncio.CancelledError):
            await asyncio.shield(self.finisher.finish(run, cancelled_status(context), pb.FINISH_REASON_CANCELLED,
                                                      None))
        elif isinstance(error, FarewayError):
            await asyncio.shield(self.finisher.finish(run, error.code, pb.FINISH_REASON_ERROR, None, error.message))

    async def _admitted(self, run: Run, route: Route, context: CallContext) -> Outcome | None:
        """Admits the request and waits for its turn; a request_id that already ran gives its Outcome."""
        outcome = await self.admission.admit(run, context)
        if outcome is None:
            await self.admission.wait_turn(run, context)
            await self.pool.learn_route(run.request.model, route)
        return outcome

    async def _undo_unless_ran(self, run: Run) -> None:
        """A request no worker took leaves no record: what its admission holds is given back."""
        if run.endpoint is None:
            await asyncio.shield(self.admission.undo(run))
            self.journal.close_soon(run)

    async def _stream(self, run: Run, call: grpc.aio.UnaryStreamCall,
                      context: CallContext) -> AsyncIterator[Delta | Final]:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                delta = run.add(message)
                if delta is not None:
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away: cancelled while waiting for the worker, or closed while its edge was
            # sending what came (GeneratorExit, at the yield). Billed for what ran either way: what the
            # worker says it spent once it stopped, not just what had reached the gateway.
            await asyncio.shield(self._finish_left(run, call, cancelled_status(context)))
            raise
        except grpc.aio.AioRpcError as error:
            failure = worker_failure(run, error)
            reason = pb.FINISH_REASON_CANCELLED if isinstance(failure, DeadlineExceeded) else pb.FINISH_REASON_ERROR
            await asyncio.shield(self.finisher.finish(run, failure.code, reason, None, failure.message))
            raise failure from None
        response = run.response()
        await self.finisher.finish_answered(run, response)
        yield Final(response)

    async def _finish_left(self, run: Run, call: grpc.aio.UnaryStreamCall, status: grpc.StatusCode) -> None:
        """One task (shielded as one: the caller's side may be cancelled again meanwhile): the worker stops,
        says what the run spent, and the run is finished with that."""
        await stop_stream(run, call)
        await self.finisher.finish(run, status, pb.FINISH_REASON_CANCELLED, None)

    async def drain(self) -> None:
        """Waits for the usage records still being written behind their answers."""
        await self.finisher.drain()
