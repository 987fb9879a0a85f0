"""Fair sharing of saturated workers across tenants: the Virtual Token Counter
(Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024).

A gateway lets at most `capacity` requests of a model run at once: the sum of
its up workers' sequence slots (max_num_seqs) times a factor. Past that,
requests wait here instead of piling onto the workers' own FIFO queues, and
the next one to run is chosen across tenants:

  1. the highest priority among the backlogged tenants' next requests;
  2. among those, the tenant with the smallest counter of service received;
  3. each tenant's own requests in arrival order.

A tenant's counter grows by (w_p * prompt tokens + w_q * completion tokens) / its
weight as its requests are served: the prompt is charged when a request is let
through (an estimate from its length, corrected to the worker's count once the
worker admits it), completion tokens as the worker streams them. A tenant that
becomes backlogged is lifted to the smallest counter among the backlogged
tenants (or, when none is, to the counter of the tenant that last left the
queue), so time spent idle is not banked as credit to flood with later.

Each gateway replica runs its share of the model's capacity, and the replicas
share the counters through Redis (gateway/fair_counters.py): a tenant served on
one replica is behind on every other, so a tenant whose client holds its
connection to one replica still gets its share there while a flood spreads
across all of them. Without Redis (or between syncs) a replica counts alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Tenant = tuple[str, str]
"""(team, project); the project is "" when teams share as a whole."""

# Byte-level BPE tokenizers average about four bytes of English per token.
_BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class FairnessConfig:
    capacity_factor: float = 1.0
    """Requests a gateway lets run on a model at once, per sequence slot (max_num_seqs) of its up workers."""
    prompt_token_weight: float = 1.0
    """w_p: service counted per prompt token."""
    completion_token_weight: float = 2.0
    """w_q: service counted per completion token (decoding costs more per token than prefill)."""
    by_project: bool = False
    """Share among team/project pairs rather than among teams."""
    sync_interval_s: float = 0.25
    """How often the counters are synced with the other replicas through Redis; 0: this replica counts alone."""

    def __post_init__(self) -> None:
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")
        if self.prompt_token_weight < 0 or self.completion_token_weight < 0:
            raise ValueError("token weights must be >= 0")
        if self.sync_interval_s < 0:
            raise ValueError(f"sync_interval_s must be >= 0, got {self.sync_interval_s}")
        if self.prompt_token_weight + self.completion_token_weight == 0:
            raise ValueError("at least one token weight must be positive")


@dataclass(frozen=True)
class Share:
    """How a tenant's requests queue: its weight among equal priorities, and its priority above them."""

    tenant: Tenant
    weight: float = 1.0
    priority: int = 0
    """Higher runs first, whatever the counters."""

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")


def estimate_prompt_tokens(prompt_bytes: int) -> int:
    return max(1, prompt_bytes // _BYTES_PER_TOKEN)


class Counters:
    """Each tenant's service received, normalized by its weight: the virtual token counters."""

    def __init__(self) -> None:
        self._values: dict[Tenant, float] = {}

    def get(self, tenant: Tenant) -> float:
        return self._values.get(tenant, 0.0)

    def tenants(self) -> list[Tenant]:
        return list(self._values)

    def add(self, tenant: Tenant, amount: float) -> None:
        self._values[tenant] = self.get(tenant) + amount

    def lift(self, tenant: Tenant, floor: float) -> None:
        """Raises the tenant's counter to `floor` if it is below."""
        self._values[tenant] = max(self.get(tenant), floor)


class Slot:
    """A running request's place in its model's capacity; charges its tenant as it is served."""

    def __init__(self, queue: FairQueue, share: Share, width: int = 1) -> None:
        self._queue = queue
        self.share = share
        self.width = width
        """Sequences it runs at once (SamplingParams.n)."""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.is_released = False

    def charge(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Brings the tenant's counter up to date with this request's service so far (totals, not increments)."""
        added = (self._queue.config.prompt_token_weight * (prompt_tokens - self.prompt_tokens)
                 + self._queue.config.completion_token_weight * (completion_tokens - self.completion_tokens))
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self._queue.counters.add(self.share.tenant, added / self.share.weight)

    def release(self) -> None:
        """Frees the slot for the next queued request (once)."""
        if not self.is_released:
            self.is_released = True
            self._queue.release(self.width)


@dataclass(eq=False)
class _Waiter:
    share: Share
    prompt_tokens_estimate: int
    granted: asyncio.Future[Slot]
    width: int = 1


class FairQueue:
    """One model's capacity, shared by VTC across tenants. Not thread-safe: one event loop."""

    def __init__(self, capacity: Callable[[], int | None], config: FairnessConfig | None = None,
                 counters: Counters | None = None) -> None:
        self._capacity = capacity
        """Requests allowed to run at once now; None: no bound (nothing is known of the workers)."""
        self.config = config or FairnessConfig()
        self.counters = counters if counters is not None else Counters()
        self._backlog: dict[Tenant, deque[_Waiter]] = {}
        """Only tenants with requests waiting."""
        self._last_left: Tenant | None = None
        self.num_running = 0
        """Sequences running (a request of n samples runs n)."""

    def depth(self) -> dict[Tenant, int]:
        """Requests waiting, per tenant seen (0 when none are)."""
        return {tenant: len(self._backlog.get(tenant, ())) for tenant in self.counters.tenants()}

    async def acquire(self, share: Share, prompt_tokens_estimate: int = 1, width: int = 1) -> Slot:
        """Waits for the request's turn; cancelling the wait leaves the queue as if it never came. `width`:
        the sequences it runs (its samples), which take that many of the capacity's places."""
        waiter = _Waiter(share, prompt_tokens_estimate, asyncio.get_running_loop().create_future(), width)
        self._enqueue(waiter)
        self.dispatch()
        try:
            return await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                waiter.granted.result().release()  # granted just as the caller went away
            else:
                self._remove(waiter)
            raise

    def try_acquire(self, share: Share, prompt_tokens_estimate: int = 1, width: int = 1) -> Slot | None:
        """A slot at once when there is room and nobody waits (as `acquire` would grant it, without
        queueing); None otherwise."""
        if self._backlog or not self._has_room(width):
            return None
        self.counters.lift(share.tenant, self._lift_to())
        self._last_left = share.tenant
        return self._start(share, prompt_tokens_estimate, width)

    def release(self, width: int = 1) -> None:
        self.num_running -= width
        self.dispatch()

    def dispatch(self) -> None:
        """Lets queued requests run while there is room (call it when capacity may have grown)."""
        while self._backlog:
            tenant = min(self._backlog, key=lambda t: (-self._backlog[t][0].share.priority, self.counters.get(t)))
            waiters = self._backlog[tenant]
            if not self._has_room(waiters[0].width):
                return  # its turn is next: nobody overtakes it
            waiter = waiters.popleft()
            if not waiters:
                del self._backlog[tenant]
                self._last_left = tenant
            self._grant(waiter)

    def _has_room(self, width: int = 1) -> bool:
        """Room for `width` more sequences; one wider than the whole capacity runs alone (none runs
        where there is no capacity at all)."""
        capacity = self._capacity()
        return capacity is None or self.num_running + width <= capacity or (self.num_running == 0 and capacity > 0)

    def _enqueue(self, waiter: _Waiter) -> None:
        tenant = waiter.share.tenant
        if tenant not in self._backlog:
            self.counters.lift(tenant, self._lift_to())
            self._backlog[tenant] = deque()
        self._backlog[tenant].append(waiter)

    def _lift_to(self) -> float:
        if self._backlog:
            return min(self.counters.get(t) for t in self._backlog)
        return self.counters.get(self._last_left) if self._last_left is not None else 0.0

    def _remove(self, waiter: _Waiter) -> None:
        tenant = waiter.share.tenant
        waiters = self._backlog.get(tenant)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del self._backlog[tenant]

    def _grant(self, waiter: _Waiter) -> None:
        waiter.granted.set_result(self._start(waiter.share, waiter.prompt_tokens_estimate, waiter.width))

    def _start(self, share: Share, prompt_tokens_estimate: int, width: int = 1) -> Slot:
        self.num_running += width
        slot = Slot(self, share, width)
        slot.charge(prompt_tokens_estimate, 0)
        return slot


class FairScheduler:
    """A FairQueue per model, created as models are first asked for."""

    def __init__(self, config: FairnessConfig, capacity: Callable[[str], int | None],
                 counters: Callable[[str], Counters] = lambda model: Counters()) -> None:
        self.config = config
        self._capacity = capacity
        self._counters = counters
        """Each model's counters (shared with the other replicas, or this process's own)."""
        self.queues: dict[str, FairQueue] = {}

    def queue(self, model: str) -> FairQueue:
        if model not in self.queues:
            self.queues[model] = FairQueue(lambda: self._capacity(model), self.config, self._counters(model))
        return self.queues[model]

    def tenant(self, team: str, project: str) -> Tenant:
        return (team, project if self.config.by_project else "")

    def dispatch(self) -> None:
        """Re-checks every model's room (after the workers changed)."""
        for queue in self.queues.values():
            queue.dispatch()

    def depths(self) -> Iterator[tuple[str, Tenant, int]]:
        """(model, tenant, requests waiting) for every tenant seen."""
        for model, queue in self.queues.items():
            for tenant, depth in queue.depth().items():
                yield model, tenant, depth
