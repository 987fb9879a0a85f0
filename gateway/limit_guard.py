"""Rate-limit admission: before a request runs it counts against its team's and
project's requests and tokens per minute and takes a concurrency slot
(fareway/quota.py); when it ends its tokens are settled and the slot freed.
The same settings give the tenant's fair share of saturated workers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from fareway.auth import Tenant
from fareway.errors import ResourceExhausted
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import TEAM_SCOPE, Exceeded, Hold, LimitsExceeded, LimitStore, RateLimiter
from fareway.redis import UNREACHABLE
from gateway.budget_guard import max_prompt_tokens
from gateway.fairness import Share

log = logging.getLogger(__name__)

_DESCRIBE = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "concurrent": "concurrent requests",
}


@dataclass(frozen=True)
class LimitGuard:
    store: LimitStore
    limiter: RateLimiter

    async def admit(self, tenant: Tenant, request_id: str, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                    context_length: int, time_remaining_s: float | None,
                    claim: tuple[str, str] | None = None) -> Hold | None:
        """Admits the request against every applicable limit, or raises RESOURCE_EXHAUSTED naming one.
        With `claim`, counts nothing (None) unless the request_id's claim is this run's."""
        limits = [x for x in await self.store.for_tenant(tenant.team, tenant.project) if x.has_rate_limits]
        if not limits:
            return Hold(tenant.team, request_id)
        completion = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else context_length
        completion = max(0, min(completion, context_length) if context_length else completion)
        tokens = max_prompt_tokens(request) + completion
        # The prompt's bound counts bytes, several times its tokens: a request may hold at most a
        # whole minute's tokens, and settles to what it really used.
        tpms = [x.tokens_per_minute for x in limits if x.tokens_per_minute]
        if tpms and completion <= min(tpms):
            tokens = min(tokens, *tpms)
        lease_s = None if time_remaining_s is None else max(time_remaining_s, 1.0) + 60.0
        try:
            return await self.limiter.admit(tenant.team, request_id, limits, tokens, lease_s=lease_s, claim=claim)
        except LimitsExceeded as refused:
            raise _refusal(tenant, refused.exceeded, completion) from None

    async def share(self, tenant: Tenant, by_project: bool) -> Share:
        """The tenant's fair-share weight and priority: the team's, or with `by_project` the project's own
        where it sets them (each project then shares as a tenant of its own)."""
        try:
            limits = await self.store.for_tenant(tenant.team, tenant.project if by_project else "")
        except UNREACHABLE as exc:
            log.warning("could not read the fair share of team %s (using weight 1, priority 0): %s", tenant.team, exc)
            limits = []
        weight = next((x.weight for x in reversed(limits) if x.weight is not None), 1.0)
        priority = next((x.priority for x in reversed(limits) if x.priority is not None), 0)
        return Share((tenant.team, tenant.project if by_project else ""), weight, priority)

    async def settle(self, hold: Hold, usage: pb.Usage) -> None:
        """Settles the request's tokens to its usage and frees its slots; never raises for Redis being away
        (its tokens then stay reserved, and its slots lapse with their lease)."""
        await self.settle_soon(hold, usage)

    def settle_soon(self, hold: Hold, usage: pb.Usage) -> Coroutine[Any, Any, None]:
        """`settle`, with its script queued before this returns: Redis calls queued before awaiting the
        result share its round trip (fareway/redis/batch.py)."""
        return _logged(self.limiter.settle_soon(hold, usage.prompt_tokens + usage.completion_tokens), hold)


def _refusal(tenant: Tenant, exceeded: Exceeded, completion_tokens: int) -> ResourceExhausted:
    who = f"team {tenant.team}" if exceeded.scope == TEAM_SCOPE else f"project {tenant.team}/{tenant.project}"
    subject = f"team:{tenant.team}" if exceeded.scope == TEAM_SCOPE else f"project:{tenant.team}/{tenant.project}"
    if exceeded.limit == "tpm_request":
        return ResourceExhausted(
            f"this request may use {completion_tokens} completion tokens, more than the {exceeded.value} tokens "
            f"per minute of {who}; lower max_tokens", subject=subject)
    message = (f"{who} is at its limit of {exceeded.value} {_DESCRIBE[exceeded.limit]}; "
               f"retry in {exceeded.retry_after_s:.3f} s")
    return ResourceExhausted(message, subject=subject, retry_after_s=exceeded.retry_after_s)


async def _logged(settling: Awaitable[None], hold: Hold) -> None:
    try:
        await settling
    except UNREACHABLE as exc:
        log.warning("could not settle the limits of request %s: %s", hold.request_id, exc)
