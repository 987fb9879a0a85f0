"""Virtual token counters shared by a model's gateway replicas, in Redis.

  fw:fair:{model}   hash: "team<US>project" -> the tenant's counter (a float)

Each replica applies the service it gives and the lifts it makes to its own view at once, and
sends them every sync (`sync_interval_s`, a quarter second by default) in one atomic script, which
returns every tenant's counter; that becomes the replica's view. A replica thus sees the others'
service at most a sync late, and keeps counting on its own while Redis is away (what it could not
send is sent with the next sync that works).

What a replica has not sent yet for a tenant is kept as (floor, amount): applied to the shared
counter c as max(c, floor) + amount, the composition of its adds and lifts in order.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from fareway.redis import UNREACHABLE, keys
from fareway.redis.batch import batched_script
from fareway.redis.scripts import lua
from gateway.fairness import Counters, Tenant

log = logging.getLogger(__name__)

DEFAULT_SYNC_INTERVAL_S = 0.25
TTL_S = 86_400
"""A model's counters are forgotten a day after the last replica serving it synced."""
_SEPARATOR = "\x1f"

class _Pending:
    """What this replica has not sent for one tenant: max(c, floor) + amount."""

    __slots__ = ("amount", "floor")

    def __init__(self, floor: float | None = None, amount: float = 0.0) -> None:
        self.floor, self.amount = floor, amount

    def apply(self, value: float) -> float:
        return (value if self.floor is None else max(value, self.floor)) + self.amount

    def then(self, later: _Pending) -> _Pending:
        """This, followed by `later`, as one."""
        floor = self.floor
        if later.floor is not None:
            floor = later.floor - self.amount if floor is None else max(floor, later.floor - self.amount)
        return _Pending(floor, self.amount + later.amount)


class SharedCounters(Counters):
    """One model's counters: a local view, synced with the other replicas' through Redis."""

    def __init__(self, store: SharedCounterStore, model: str) -> None:
        super().__init__()
        self._store = store
        self.model = model
        self._pending: dict[Tenant, _Pending] = {}

    def add(self, tenant: Tenant, amount: float) -> None:
        super().add(tenant, amount)
        self._pending[tenant] = self._pending.get(tenant, _Pending()).then(_Pending(None, amount))

    def lift(self, tenant: Tenant, floor: float) -> None:
        if floor <= self.get(tenant):
            self._values.setdefault(tenant, self.get(tenant))  # seen, though not raised
            return
        super().lift(tenant, floor)
        self._pending[tenant] = self._pending.get(tenant, _Pending()).then(_Pending(floor))

    async def sync(self) -> None:
        """Sends this replica's changes and takes in every replica's counters."""
        sent, self._pending = self._pending, {}
        args: list[str | float] = [TTL_S]
        for (team, project), pending in sent.items():
            args += [f"{team}{_SEPARATOR}{project}", "" if pending.floor is None else repr(pending.floor),
                     repr(pending.amount)]
        try:
            reply = await self._store.script(keys=[keys.fair_counters(self.model)], args=args)
        except BaseException:
            # Not sent: keep it ahead of what came since, for the next sync.
            for tenant, pending in self._pending.items():
                sent[tenant] = sent.get(tenant, _Pending()).then(pending)
            self._pending = sent
            raise
        shared = {_tenant(field): float(value) for field, value in zip(reply[::2], reply[1::2], strict=True)}
        for tenant in self._values.keys() - shared.keys():
            shared[tenant] = 0.0  # expired in Redis (or never sent): start again from nothing
        self._values = {tenant: (self._pending[tenant].apply(value) if tenant in self._pending else value)
                        for tenant, value in shared.items()}


def _tenant(field: str) -> Tenant:
    team, _, project = field.partition(_SEPARATOR)
    return team, project


class SharedCounterStore:
    """Every model's shared counters in one gateway, and the loop that syncs them."""

    def __init__(self, redis: aioredis.Redis, sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S) -> None:
        if sync_interval_s <= 0:
            raise ValueError(f"sync_interval_s must be positive, got {sync_interval_s}")
        self.script = batched_script(redis, lua("fair_counters_sync"))
        self.sync_interval_s = sync_interval_s
        self.models: dict[str, SharedCounters] = {}

    def counters(self, model: str) -> SharedCounters:
        if model not in self.models:
            self.models[model] = SharedCounters(self, model)
        return self.models[model]

    async def sync(self) -> None:
        """Syncs every model's counters (their scripts share one round trip)."""
        await asyncio.gather(*(counters.sync() for counters in list(self.models.values())))

    async def sync_forever(self) -> None:
        away = False
        while True:
            try:
                await self.sync()
                if away:
                    log.info("fair-share counters are synced again")
                away = False
            except UNREACHABLE as exc:
                if not away:  # said once, not at every sync while Redis stays away
                    log.info("fair-share counters are not synced while Redis is away: %s", exc)
                away = True
            except Exception:  # noqa: BLE001 - one bad sync must not end the syncs for good
                log.exception("syncing the fair-share counters failed (retried in %.2f s)", self.sync_interval_s)
            await asyncio.sleep(self.sync_interval_s)
