"""Failover: a request goes to the first of its workers, in the routing policy's order, that takes it.

One loop (`Failover.first`) serves both kinds of worker call (gateway/worker_calls.py): a call that
finds its worker unable to take the request raises WorkerRefused, and the next worker is tried, up to
`max_attempts`; past them the caller gets UNAVAILABLE naming what each worker answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from fareway.errors import Unavailable, shown
from gateway.pool import WorkerEndpoint, WorkerPool
from gateway.routing import Route

T = TypeVar("T")


class WorkerRefused(Exception):
    """The worker did not take the request; the next one may."""

    def __init__(self, reason: str, *, is_down: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.is_down = is_down
        """The worker cannot be reached: it counts as down until its next refresh."""


class Failover:
    def __init__(self, pool: WorkerPool, max_attempts: int) -> None:
        self.pool = pool
        self.max_attempts = max_attempts

    async def first(self, model: str, route: Route, attempt: Callable[[WorkerEndpoint], Awaitable[T]]) -> T:
        """What `attempt` returns for the first worker that takes the request."""
        refusals = []
        for endpoint in self.pool.candidates(model, route)[: self.max_attempts]:
            try:
                return await attempt(endpoint)
            except WorkerRefused as refused:
                if refused.is_down:
                    self.pool.mark_down(endpoint)
                refusals.append(f"{endpoint.address}: {refused.reason}")
        raise Unavailable(f"no worker for model {shown(model)} could take the request "
                          f"({'; '.join(refusals) or 'none tried'})")
