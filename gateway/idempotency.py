"""request_id as an idempotency key: one id names exactly one run.

The first request with an id claims it; when it ends, its outcome (the
response, or the status it failed with) is stored for a day. A later request
with the same id gets that outcome back without running or being charged
again; one that arrives while the first still runs gets ABORTED. A request
that fails before reaching any worker releases its claim, so it can be retried.

A claim also keeps a fingerprint of its request (a hash of every field but the id; a stream and a
unary call of the same request match): a later request with the id and another fingerprint is refused
with INVALID_ARGUMENT, as Stripe and the IETF Idempotency-Key draft refuse a key reused for another
request, instead of getting another request's answer.

A claim carries its run's owner token, and goes to Redis in the same round trip as the request's
admission, ahead of it: the admission scripts (fareway/quota.py) count the
request only if the claim is its run's, so a replay or a duplicate counts for nothing.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis

from fareway.auth import Tenant
from fareway.errors import Aborted, FarewayError, InvalidArgument
from fareway.inference.v1 import inference_pb2 as pb
from fareway.redis import keys
from fareway.redis.batch import batched_script
from fareway.redis.scripts import lua


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    message: str = ""
    response: pb.GenerateResponse | None = None


class IdempotencyStore:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int, lease_s: int) -> None:
        self._redis = redis
        self._claim = batched_script(redis, lua("idempotency_claim"))
        self._complete = batched_script(redis, lua("idempotency_complete"))
        self._ttl_s = ttl_s
        self._lease_s = lease_s

    @staticmethod
    def key(tenant: Tenant, request_id: str) -> str:
        """The id's claim (hash-tagged by team, like the team's limits and budgets)."""
        return keys.request_id_claim(tenant.team, tenant.project, request_id)

    async def claim(self, tenant: Tenant, request_id: str, owner: str = "", fingerprint: str = "") -> Outcome | None:
        """Claims the id for `owner`; None if this request may run, else the earlier run's outcome. Raises
        ABORTED while an earlier run with the id has not ended, and INVALID_ARGUMENT if that run's request
        had another `fingerprint` (`fingerprint_of`)."""
        return await self.claim_soon(tenant, request_id, owner, fingerprint)

    def claim_soon(self, tenant: Tenant, request_id: str, owner: str = "",
                   fingerprint: str = "") -> Coroutine[Any, Any, Outcome | None]:
        """`claim`, with its script queued at once (fareway/redis/batch.py): it shares the round trip of
        the calls queued with it (the request's admission, which counts the request only if `owner` got
        the claim). Await what it returns."""
        claiming = self._claim(keys=[self.key(tenant, request_id)], args=[self._lease_s, owner, fingerprint])
        return _claimed(claiming, request_id, fingerprint)

    async def complete(self, tenant: Tenant, request_id: str, outcome: Outcome) -> None:
        await self.complete_soon(tenant, request_id, outcome)

    def complete_soon(self, tenant: Tenant, request_id: str, outcome: Outcome) -> Awaitable[Any]:
        """`complete`, with its script queued at once (fareway/redis/batch.py): it shares the round trip of
        the calls queued with it, and a later claim of the id through this client finds it. Await what it
        returns."""
        fields = ["state", "done", "code", outcome.code.name, "message", outcome.message]
        if outcome.response is not None:
            fields += ["response", base64.b64encode(outcome.response.SerializeToString()).decode()]
        return self._complete(keys=[self.key(tenant, request_id)], args=[self._ttl_s, *fields])

    async def release(self, tenant: Tenant, request_id: str) -> None:
        await self._redis.delete(self.key(tenant, request_id))


def fingerprint_of(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> str:
    """A hash of everything the request asks for but its id. The two request types share their field
    numbers, so a stream and a unary call of the same request have one fingerprint."""
    copy = pb.GenerateRequest.FromString(request.SerializeToString())
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:32]


async def _claimed(claiming: Awaitable[list[str]], request_id: str, fingerprint: str) -> Outcome | None:
    values = await claiming
    if not values:
        return None
    stored = dict(zip(values[::2], values[1::2]))
    if fingerprint and stored.get("fingerprint", fingerprint) != fingerprint:
        raise InvalidArgument(f"request_id {request_id!r} was already used for a different request (another "
                              "model, input, sampling or tags); an id names one request: send a new request_id",
                              field="request_id")
    if stored.get("state") != "done":
        raise Aborted(f"request_id {request_id!r} is already running; wait for it or use a new id")
    code = grpc.StatusCode[stored["code"]]
    response = None
    if stored.get("response"):
        response = pb.GenerateResponse.FromString(base64.b64decode(stored["response"]))
    return Outcome(code, stored.get("message", ""), response)


def replay(outcome: Outcome, request_id: str) -> pb.GenerateResponse:
    """The stored response, or the stored failure raised again."""
    if outcome.code is grpc.StatusCode.OK and outcome.response is not None:
        return outcome.response
    error = FarewayError(f"request_id {request_id!r} already ran and ended with {outcome.code.name}: "
                         f"{outcome.message}; send a new request_id to run it again")
    error.code = outcome.code
    raise error
