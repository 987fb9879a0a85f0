"""Admission: what a request must pass, and hold, before it reaches a worker, and how that is undone.

A request is admitted in one Redis round trip (fareway/redis/batch.py): its request_id's claim
first (gateway/idempotency.py), then the rate-limit script and the budget reservation
(fareway/quota.py), which count it only if its run got the claim. Past the workers' capacity it
then waits for its tenant's fair turn (gateway/fairness.py). A request refused on the way, or that
no worker takes, is undone: its reservation and claim are released and it leaves no usage record.
However a request ends, its concurrency slots are freed and its tokens settled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any

from accounting.recorder import UsageRecorder
from fareway.auth import Tenant
from fareway.errors import DeadlineExceeded, Internal, ResourceExhausted
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import (
    NANO_USD_PER_USD,
    TEAM_SCOPE,
    BudgetRefused,
    Budgets,
    Exceeded,
    Hold,
    LimitsExceeded,
    LimitStore,
    RateLimiter,
    Reservation,
)
from fareway.redis import UNREACHABLE
from gateway.fairness import FairScheduler, Share, estimate_prompt_tokens
from gateway.idempotency import IdempotencyStore, Outcome, fingerprint_of
from gateway.pool import WorkerPool
from gateway.run import CallContext, Run

log = logging.getLogger(__name__)

# Chat templates wrap each message in a few special tokens (role markers, separators).
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS = 16
_DESCRIBE = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "concurrent": "concurrent requests",
}

GenerateRequest = pb.GenerateRequest | pb.GenerateStreamRequest


def max_prompt_tokens(request: GenerateRequest) -> int:
    """An upper bound on the prompt's tokens without tokenizing it.

    Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-style) never emit
    a token for less than one byte of text, so the UTF-8 length bounds the
    text's tokens; the template adds a few special tokens per message.
    """
    if request.WhichOneof("input") == "prompt":
        return len(request.prompt.encode()) + _TEMPLATE_TOKENS
    messages = request.chat.messages
    return (sum(len(m.content.encode()) + len(m.role.encode()) for m in messages)
            + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + _TEMPLATE_TOKENS)


def max_completion_tokens(request: GenerateRequest, context_length: int) -> int:
    """max_tokens, or what the context holds when it is unset (0: context length unknown), for each of
    the request's samples."""
    completion = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else context_length
    return max(0, min(completion, context_length) if context_length else completion) * num_samples(request)


def num_samples(request: GenerateRequest) -> int:
    return request.sampling.n if request.sampling.HasField("n") else 1


class Admission:
    def __init__(self, pool: WorkerPool, recorder: UsageRecorder, idempotency: IdempotencyStore,
                 budgets: Budgets, limits: LimitStore, limiter: RateLimiter,
                 cost_reserve_usd_per_million_tokens: float, fairness: FairScheduler | None = None) -> None:
        self.pool = pool
        self.recorder = recorder
        self.idempotency = idempotency
        self.budgets = budgets
        self.limits = limits
        self.limiter = limiter
        self.cost_reserve_usd_per_million_tokens = cost_reserve_usd_per_million_tokens
        """What a "cost" (cost to serve) budget holds per token while a request runs: an estimate,
        since GPU time is only known afterwards. "list" budgets hold an exact upper bound."""
        self.fairness = fairness
        # Claim owner tokens: unique across gateways by the random prefix, and cheaper than a uuid each.
        self._owner_prefix = uuid.uuid4().hex[:16]
        self._owner_numbers = itertools.count()

    async def admit(self, run: Run, context: CallContext) -> Outcome | None:
        """Counts the request against its rate limits, then holds its maximum cost against its budgets
        (RESOURCE_EXHAUSTED past either). One with a request_id claims the id in the same round trip, the
        claim queued first, and the admission scripts count the request only if its run got the claim:
        an id that already ran is replayed (its Outcome is returned), even to a tenant at its limits, and
        neither counted nor charged again; one still running gets ABORTED and counts for nothing either.

        A caller that goes away (or whose deadline passes) while the scripts are on their way still has
        `run` learn what they took, before the cancellation goes on, so that the caller's undo and
        release give it all back (else its concurrency slot and reservation would stay held until their
        leases lapse)."""
        admitting = asyncio.ensure_future(self._admit(run, context))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            await asyncio.wait([admitting])  # one round trip
            if not admitting.cancelled():
                admitting.exception()  # retrieved: the cancellation is what the caller sees
            raise

    async def _admit(self, run: Run, context: CallContext) -> Outcome | None:
        if not run.request.request_id:
            await self._hold(run, context)
            return None
        owner = f"{self._owner_prefix}-{next(self._owner_numbers)}"
        claiming = self.idempotency.claim_soon(run.tenant, run.request.request_id, owner,
                                               fingerprint_of(run.request))
        claim = (self.idempotency.key(run.tenant, run.request.request_id), owner)
        refused: BaseException | None = None
        counted = False
        try:
            counted = await self._hold(run, context, claim)
        except BaseException as exc:  # noqa: BLE001 - raised below, once the claim is known
            refused = exc
        try:
            outcome = await claiming
        except BaseException:
            if isinstance(refused, asyncio.CancelledError):
                raise refused from None
            raise
        if outcome is None:
            run.claimed = True  # released by `undo` if the request goes no further
            if refused is None and not counted:
                raise Internal("the request's admission reached Redis ahead of its request_id's claim")
        if refused is not None:
            raise refused
        return outcome

    async def _hold(self, run: Run, context: CallContext,
                    claim: tuple[str, str] | None = None) -> bool:
        """Takes the request's rate-limit hold and budget reservation, or neither. With `claim` (its
        request_id's claim key and this run's owner token), nothing is counted unless the run got the
        claim; whether it was counted."""
        endpoints = self.pool.serving(run.request.model)
        context_length = max((e.info.context_length for e in endpoints if e.info), default=0)
        # Side by side, so both scripts share one Redis round trip: the budget's is queued at once, the
        # limits' when their (cached) settings are read. What one admitted is undone when the other
        # refuses: the hold is settled and the reservation released as for any request that never ran.
        reserving = await self._reserve_soon(run, context_length, claim)
        refused: BaseException | None = None
        try:
            run.hold = await limit_hold(self.limits, self.limiter, run.tenant, run.request_id, run.request,
                                        context_length, context.time_remaining(), claim)
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

    async def _reserve_soon(self, run: Run, context_length: int,
                            claim: tuple[str, str] | None) -> Awaitable[Reservation | None]:
        """Queues the reservation of the request's maximum cost (fareway/redis/batch.py); what is returned
        raises RESOURCE_EXHAUSTED naming the budget it would pass. With `claim`, holds nothing (None)
        unless the request_id's claim is this run's."""
        tenant, request = run.tenant, run.request
        prompt = max_prompt_tokens(request)
        completion = max_completion_tokens(request, context_length) if context_length else 0  # 0: no worker known
        now = time.time()
        max_list = await self.recorder.max_list_price_nusd(request.model, prompt, completion, now)
        max_cost = round((prompt + completion) * self.cost_reserve_usd_per_million_tokens * NANO_USD_PER_USD / 1e6)
        reserving = self.budgets.reserve_soon(tenant.team, tenant.project, run.request_id, max_cost_nusd=max_cost,
                                              max_list_nusd=max_list, now=now, claim=claim)
        return _reserved(reserving, tenant, max_cost_nusd=max_cost, max_list_nusd=max_list)

    async def wait_turn(self, run: Run, context: CallContext) -> None:
        """Past the workers' capacity, waits for the tenant's fair turn (gateway/fairness.py)."""
        if self.fairness is None:
            return
        share = await fair_share(self.limits, run.tenant, self.fairness.config.by_project)
        queue = self.fairness.queue(run.request.model)
        prompt_tokens = estimate_prompt_tokens(max_prompt_tokens(run.request))
        width = num_samples(run.request)
        if (slot := queue.try_acquire(share, prompt_tokens, width)) is not None:
            run.slot = slot  # room, and nobody waiting
            return
        try:
            async with asyncio.timeout(context.time_remaining()):
                run.slot = await queue.acquire(share, prompt_tokens, width)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited for a worker") from None

    async def undo(self, run: Run) -> None:
        """Undoes the admission of a request that never reached a worker: it leaves no record."""
        if run.reservation is not None:
            await self.budgets.release(run.tenant.team, run.reservation)
        if run.claimed:
            await self.idempotency.release(run.tenant, run.request.request_id)

    def settle_soon(self, run: Run) -> Coroutine[Any, Any, None]:
        """Queues the settlement of the request's tokens to its usage and the release of its concurrency
        slots (fareway/redis/batch.py); what is returned never raises for Redis being away (the tokens
        then stay reserved, and the slots lapse with their lease)."""
        assert run.hold is not None
        return _logged(self.limiter.settle_soon(run.hold, run.usage.prompt_tokens + run.usage.completion_tokens),
                       run.hold)

    async def release(self, run: Run) -> None:
        """However the request ended (a refusal, a worker failure, the caller going away): its fair-queue
        slot is freed, and unless its usage record settles them, its tokens are settled to what it used
        and its concurrency slots freed."""
        if run.slot is not None:
            run.slot.release()
        if run.hold is not None and not run.hold.settled and not run.finishing_behind:
            await asyncio.shield(self.settle_soon(run))


async def limit_hold(limits: LimitStore, limiter: RateLimiter, tenant: Tenant, request_id: str,
                     request: GenerateRequest, context_length: int, time_remaining_s: float | None,
                     claim: tuple[str, str] | None = None) -> Hold | None:
    """The request's hold on every limit of its team and project, or RESOURCE_EXHAUSTED naming the one it
    would pass. With `claim`, counts nothing (None) unless the request_id's claim is this run's."""
    applicable = [x for x in await limits.for_tenant(tenant.team, tenant.project) if x.has_rate_limits]
    if not applicable:
        return Hold(tenant.team, request_id)
    completion = max_completion_tokens(request, context_length)
    tokens = max_prompt_tokens(request) + completion
    # The prompt's bound counts bytes, several times its tokens: a request may hold at most a
    # whole minute's tokens, and settles to what it really used.
    tpms = [x.tokens_per_minute for x in applicable if x.tokens_per_minute]
    if tpms and completion <= min(tpms):
        tokens = min(tokens, *tpms)
    lease_s = None if time_remaining_s is None else max(time_remaining_s, 1.0) + 60.0
    try:
        return await limiter.admit(tenant.team, request_id, applicable, tokens, lease_s=lease_s, claim=claim)
    except LimitsExceeded as refused:
        raise _limit_refusal(tenant, refused.exceeded, completion) from None


async def fair_share(limits: LimitStore, tenant: Tenant, by_project: bool) -> Share:
    """The tenant's fair-share weight and priority: the team's, or with `by_project` the project's own
    where it sets them (each project then shares as a tenant of its own)."""
    try:
        found = await limits.for_tenant(tenant.team, tenant.project if by_project else "")
    except UNREACHABLE as exc:
        log.warning("could not read the fair share of team %s (using weight 1, priority 0): %s", tenant.team, exc)
        found = []
    weight = next((x.weight for x in reversed(found) if x.weight is not None), 1.0)
    priority = next((x.priority for x in reversed(found) if x.priority is not None), 0)
    return Share((tenant.team, tenant.project if by_project else ""), weight, priority)


def _limit_refusal(tenant: Tenant, exceeded: Exceeded, completion_tokens: int) -> ResourceExhausted:
    who = f"team {tenant.team}" if exceeded.scope == TEAM_SCOPE else f"project {tenant.team}/{tenant.project}"
    subject = f"team:{tenant.team}" if exceeded.scope == TEAM_SCOPE else f"project:{tenant.team}/{tenant.project}"
    if exceeded.limit == "tpm_request":
        return ResourceExhausted(
            f"this request may use {completion_tokens} completion tokens, more than the {exceeded.value} tokens "
            f"per minute of {who}; lower max_tokens", subject=subject)
    message = (f"{who} is at its limit of {exceeded.value} {_DESCRIBE[exceeded.limit]}; "
               f"retry in {exceeded.retry_after_s:.3f} s")
    return ResourceExhausted(message, subject=subject, retry_after_s=exceeded.retry_after_s)


async def _reserved(reserving: Awaitable[Reservation | None], tenant: Tenant, *, max_cost_nusd: int,
                    max_list_nusd: int) -> Reservation | None:
    try:
        return await reserving
    except BudgetRefused as refused:
        r = refused.refusal
        scope = f"team {tenant.team}" if r.scope == TEAM_SCOPE else f"project {tenant.team}/{r.scope[8:]}"
        raise ResourceExhausted(
            f"the monthly {r.basis} budget of {scope} would be passed: ${r.spent_nusd / 1e9:.6f} spent and "
            f"${r.reserved_nusd / 1e9:.6f} held by running requests of ${r.hard_nusd / 1e9:.2f}; this request "
            "may cost up to "
            f"${(max_list_nusd if r.basis == 'list' else max_cost_nusd) / 1e9:.6f} (lower max_tokens, or raise "
            "the budget)",
            subject=f"budget:{tenant.team}" + ("" if r.scope == TEAM_SCOPE else f"/{r.scope[8:]}")) from None


async def _logged(settling: Awaitable[None], hold: Hold) -> None:
    try:
        await settling
    except UNREACHABLE as exc:
        log.warning("could not settle the limits of request %s: %s", hold.request_id, exc)
