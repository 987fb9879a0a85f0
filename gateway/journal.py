"""Exactly one usage record per run, through a gateway killed at any point (SIGKILL included).

Before a request goes to a worker, its gateway writes the run to its journal in Redis: who asked, under
which call id, and what its admission holds (rate-limit hold, budget reservation, request_id claim). The
entry leaves the journal in the round trip that writes the run's usage record (or, for a run no worker
took, the one that undoes its admission). While it runs, a gateway keeps a liveness key of its own alive.

A sweeper in every gateway settles what a gateway left: the journals of gateways whose liveness lapsed,
and its own entries that outlived their runs (their record went to the spool while Redis was away, say).
For each run it asks the workers serving the model what the run with that call id did
(WorkerService.GetRun: a worker keeps the account of its recent runs, the ones whose caller vanished
included) and finishes it as its gateway would have: one record with the tokens and device time the
worker reports, its tokens settled against its rate limits and its concurrency slots freed, its budget
reservation settled by the record, and its request_id's outcome stored as UNAVAILABLE (the answer never
reached the caller: a retry with the id is told so, and is not run and billed again). The ledger
refuses a second record of one request id, so a sweeper racing a late record, or another sweeper, adds
nothing. A run still running on its worker waits for the next sweep. A run that no worker knows (it
never reached one, or its worker is gone too) is released without a record once every worker serving
its model has said so; the journal keeps it while one cannot be asked, and gives up after `give_up_s`.

  fw:{gateway:<id>}:journal   hash: call id -> the run (JSON)
  fw:{gateway:<id>}:alive     exists while the gateway runs (renewed every sweep; lapses after ttl_s)
  fw:{gateway:<id>}:sweeping  held by the one gateway sweeping a lapsed gateway's journal
  fw:journal:gateways         set: the gateways that journaled
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis

from fareway.auth import Role, Tenant
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import Hold, Reservation
from fareway.redis import UNREACHABLE, keys
from fareway.redis.batch import batcher_for
from fareway.worker.v1 import worker_pb2 as wpb
from gateway.admission import Admission
from gateway.config import JournalConfig
from gateway.finishing import Finisher
from gateway.idempotency import IdempotencyStore, Outcome
from gateway.pool import WorkerEndpoint, WorkerPool
from gateway.run import Run

log = logging.getLogger(__name__)

_ASK_TIMEOUT_S = 2.0
_ENDED = frozenset({pb.FINISH_REASON_STOP, pb.FINISH_REASON_STOP_SEQUENCE, pb.FINISH_REASON_LENGTH})
LEFT_MESSAGE = ("the gateway serving this request stopped before it answered; what the run used was recorded; "
                "send a new request_id to run it again")


@dataclass(frozen=True)
class Entry:
    """A run as its journal keeps it: enough to finish it as its gateway would have."""

    team: str
    project: str
    key_id: str
    request_id: str
    """The run's id: its record's."""
    client_request_id: str
    """The request_id the caller sent ("" for none)."""
    model: str
    tags: dict[str, str]
    started_at: float
    hold: dict | None
    reservation: dict | None
    claimed: bool

    @classmethod
    def of(cls, run: Run) -> Entry:
        # Not dataclasses.asdict (it deep-copies): this is on every request's path.
        hold, reservation = run.hold, run.reservation
        return cls(run.tenant.team, run.tenant.project, run.tenant.key_id, run.request_id, run.request.request_id,
                   run.request.model, dict(run.request.tags), run.started_at,
                   None if hold is None else {"team": hold.team, "request_id": hold.request_id, "tokens": hold.tokens,
                                              "slots": hold.slots, "settled": hold.settled},
                   None if reservation is None else {"month": reservation.month, "field": reservation.field},
                   run.claimed)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Entry:
        return cls(**json.loads(text))

    def run(self) -> Run:
        """The run, as the sweeper finishes it: its request carries no request_id, whose outcome the
        sweeper stores itself."""
        request = pb.GenerateRequest(model=self.model, tags=self.tags)
        run = Run(Tenant(self.team, self.project, self.key_id, Role.TENANT), request, self.request_id,
                  started_at=self.started_at)
        if self.hold is not None:
            hold = dict(self.hold)
            hold["tokens"] = {scope: tuple(pair) for scope, pair in hold["tokens"].items()}
            run.hold = Hold(**hold)
        if self.reservation is not None:
            run.reservation = Reservation(**self.reservation)
        return run


class Journal:
    """This gateway's journal."""

    def __init__(self, redis: aioredis.Redis, gateway_id: str, config: JournalConfig) -> None:
        self.redis = redis
        self.gateway_id = gateway_id
        self.config = config
        self.key = keys.gateway_journal(gateway_id)
        self.open_calls: set[str] = set()
        """Call ids of the runs this gateway is serving now."""

    async def renew(self) -> None:
        """Says the gateway is alive for another ttl_s (and that it journals)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.gateway_alive(self.gateway_id), "1", px=int(self.config.ttl_s * 1000))
            pipe.sadd(keys.JOURNALED_GATEWAYS, self.gateway_id)
            await pipe.execute()

    async def open(self, run: Run) -> None:
        """Writes the run before it goes to a worker (one round trip). If this fails or is cancelled, the
        entry may still be written: the caller's undo closes it (`close_soon`) all the same."""
        self.open_calls.add(run.call_id)
        await batcher_for(self.redis).command("HSET", self.key, run.call_id, Entry.of(run).to_json())

    def close_soon(self, run: Run) -> None:
        """Queues the run's removal behind what is queued already (its record); nothing waits for it. Lost
        (Redis away), the entry is settled by the sweeper, which finds its record."""
        if not run.call_id or run.call_id not in self.open_calls:
            return
        self.open_calls.discard(run.call_id)
        closing = batcher_for(self.redis).command("HDEL", self.key, run.call_id)
        closing.add_done_callback(_ignore_failure)

    async def stop(self) -> None:
        """A gateway that stopped in order leaves an empty journal and no liveness behind."""
        if self.open_calls:
            log.warning("the gateway stops with %d runs in its journal; a live gateway's sweeper will settle them",
                        len(self.open_calls))
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.key, keys.gateway_alive(self.gateway_id))
            pipe.srem(keys.JOURNALED_GATEWAYS, self.gateway_id)
            await pipe.execute()


def _ignore_failure(future: asyncio.Future) -> None:  # type: ignore[type-arg]
    if not future.cancelled() and (error := future.exception()) is not None:
        log.debug("a journal entry was not removed (the sweeper settles it): %s", error)


class Sweeper:
    """Settles the runs that gateways left (see the module's docstring)."""

    def __init__(self, journal: Journal, pool: WorkerPool, admission: Admission, finisher: Finisher,
                 idempotency: IdempotencyStore) -> None:
        self.journal = journal
        self.redis = journal.redis
        self.config = journal.config
        self.pool = pool
        self.admission = admission
        self.finisher = finisher
        self.idempotency = idempotency
        self.settled = 0
        """Runs this sweeper finished with a record."""
        self.released = 0
        """Runs it released without one."""

    async def sweep_forever(self) -> None:
        while True:
            try:
                await self.journal.renew()
                await self.sweep()
            except UNREACHABLE as exc:
                log.info("the journal sweep waits for Redis: %s", exc)
            except Exception:  # noqa: BLE001 - one bad sweep must not end the sweeps for good
                log.exception("the journal sweep failed (retried in %.1f s)", self.config.sweep_interval_s)
            await asyncio.sleep(self.config.sweep_interval_s)

    async def sweep(self, now: float | None = None) -> None:
        """One pass over every journal this gateway may settle now."""
        for gateway_id in sorted(await self.redis.smembers(keys.JOURNALED_GATEWAYS)):
            mine = gateway_id == self.journal.gateway_id
            if not mine:
                if await self.redis.exists(keys.gateway_alive(gateway_id)):
                    continue
                # One sweeper per lapsed journal at a time (another's would only repeat the work).
                lock_ms = int(max(self.config.ttl_s, 4 * _ASK_TIMEOUT_S) * 1000)
                if not await self.redis.set(keys.gateway_sweeping(gateway_id), self.journal.gateway_id,
                                            nx=True, px=lock_ms):
                    continue
            await self._sweep_journal(gateway_id, mine, time.time() if now is None else now)

    async def _sweep_journal(self, gateway_id: str, mine: bool, now: float) -> None:
        key = keys.gateway_journal(gateway_id)
        entries = await self.redis.hgetall(key)
        if not entries and not mine:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.srem(keys.JOURNALED_GATEWAYS, gateway_id)
                pipe.delete(keys.gateway_sweeping(gateway_id))
                await pipe.execute()
            return
        for call_id, text in entries.items():
            if mine and call_id in self.journal.open_calls:
                continue
            try:
                entry = Entry.from_json(text)
            except (ValueError, TypeError) as exc:
                log.error("journal %s holds an unreadable run %s (%s); dropped", gateway_id, call_id[:64], exc)
                await self.redis.hdel(key, call_id)
                continue
            if mine and now - entry.started_at < self.config.ttl_s:
                continue  # its removal may still be on its way
            if await self._settle(call_id, entry, now):
                await self.redis.hdel(key, call_id)

    async def _settle(self, call_id: str, entry: Entry, now: float) -> bool:
        """Finishes one run; whether it is done with (False: ask again next sweep)."""
        if await self.redis.exists(keys.recorded(entry.team, entry.project, entry.request_id)):
            # Recorded, its settlement with it, unless Redis was away then (the record went to the spool,
            # the settlement nowhere): its concurrency slots are freed again (freeing is idempotent; its
            # tokens, corrected only once, stay as reserved).
            if entry.hold is not None and entry.hold["slots"]:
                slots_only = Hold(entry.team, entry.request_id, slots=list(entry.hold["slots"]))
                await self.admission.limiter.settle_soon(slots_only, 0)
            return True
        try:
            endpoints = self.pool.serving(entry.model)
        except Exception:  # noqa: BLE001 - no worker serves the model now: nobody to ask
            endpoints = []
        answers = await asyncio.gather(*(_ask(e, call_id) for e in endpoints))
        for endpoint, answer in zip(endpoints, answers):
            if answer is not None and answer.state == wpb.GetRunResponse.STATE_RUNNING:
                return False  # its worker is stopping it, or it runs to its end: next sweep
        finished = [(e, a) for e, a in zip(endpoints, answers) if a is not None
                    and a.state == wpb.GetRunResponse.STATE_FINISHED]
        if finished:
            # A run a worker gave up on and another then ran (failover) is billed for the one that ended.
            endpoint, answer = max(finished, key=lambda pair: pair[1].response.finish_reason in _ENDED)
            await self._record(entry, endpoint, answer.response)
            return True
        age = now - entry.started_at
        everyone_answered = bool(endpoints) and all(a is not None for a in answers)
        if (everyone_answered and age >= self.config.unknown_grace_s) or age >= self.config.give_up_s:
            await self._release(entry, everyone_answered)
            return True
        return False

    async def _record(self, entry: Entry, endpoint: WorkerEndpoint, response: wpb.GenerateResponse) -> None:
        run = entry.run()
        run.endpoint = endpoint
        run.add_whole(response)
        run.started_monotonic = time.monotonic() - response.usage.total_ms / 1000
        status = grpc.StatusCode.OK if response.finish_reason in _ENDED else grpc.StatusCode.CANCELLED
        finish_reason = response.finish_reason or pb.FINISH_REASON_CANCELLED
        await self.finisher.finish(run, status, finish_reason, None, LEFT_MESSAGE)
        if entry.claimed:
            await self.idempotency.complete(run.tenant, entry.client_request_id,
                                            Outcome(grpc.StatusCode.UNAVAILABLE, LEFT_MESSAGE))
        self.settled += 1
        log.info("settled run %s (request %s of team %s) left by its gateway: %d + %d tokens", entry.request_id,
                 entry.client_request_id or "-", entry.team, run.usage.prompt_tokens, run.usage.completion_tokens)

    async def _release(self, entry: Entry, everyone_answered: bool) -> None:
        run = entry.run()
        if run.hold is not None:
            await self.admission.settle_soon(run)  # settles to the 0 tokens it used
        await self.admission.undo(run)
        if entry.claimed:
            await self.idempotency.release(run.tenant, entry.client_request_id)
        self.released += 1
        why = "no worker serving its model knows it" if everyone_answered else "its workers could not be asked"
        log.warning("released run %s (request %s of team %s) left by its gateway without a record: %s",
                    entry.request_id, entry.client_request_id or "-", entry.team, why)


async def _ask(endpoint: WorkerEndpoint, call_id: str) -> wpb.GetRunResponse | None:
    """The worker's account of the run; None if it cannot be asked now."""
    try:
        return await endpoint.stub.GetRun(wpb.GetRunRequest(call_id=call_id), timeout=_ASK_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        log.debug("could not ask worker %s about run %s: %s", endpoint.address, call_id, error.code().name)
        return None
