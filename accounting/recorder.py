"""The seam between accounting and the services that produce usage, which link it in-process: the one
module of accounting that gateway/ and workers/ import (tests/test_layers.py holds them to it).

- The gateway's usage records (`UsageRecorder`): priced with the price book in force, written to
  the ledger in one atomic step, or spooled to disk while Redis is unreachable and replayed when
  it is back. Nothing is lost and nothing is counted twice. The gateway also asks it what a
  request may cost at most, for budgets (`max_list_price_nusd`).
- The worker's device time (`CapacityStore`, `WorkerInfo`), and the price of its hardware
  (`hardware_price`) that it registers with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from accounting.capacity import CapacityStore, WorkerInfo
from accounting.ledger import Ledger
from accounting.pricebook import PriceBook, price_record
from accounting.pricebook_store import PriceBookCache, PriceBookStore
from accounting.records import UsageRecord
from accounting.spool import Spool
from fareway.process import stop_task
from fareway.redis import UNREACHABLE

__all__ = ["CapacityStore", "UsageRecord", "UsageRecorder", "WorkerInfo", "hardware_price"]

log = logging.getLogger(__name__)

REPLAY_INTERVAL_S = 2.0
_REPLAY_BATCH = 500


async def hardware_price(redis: aioredis.Redis, hardware_class: str) -> float | None:
    """USD per device-hour of the hardware class in the price book in force; None when there is none
    (no price book loaded, or Redis unreachable)."""
    try:
        book = await PriceBookStore(redis).current()
    except UNREACHABLE:
        return None
    price = book.hardware_price(hardware_class, time.time()) if book else None
    return price.usd_per_device_hour if price else None


class UsageRecorder:
    def __init__(self, ledger: Ledger, spool: Spool | None = None, prices: PriceBookCache | None = None) -> None:
        self.ledger = ledger
        self.spool = spool
        self.prices = prices or PriceBookCache(PriceBookStore(ledger.redis))
        self._replayer: asyncio.Task[None] | None = None
        self.unreachable = False
        """Whether the last write found Redis unreachable (and went to the spool)."""

    @classmethod
    def open(cls, redis: aioredis.Redis, spool_dir: Path | None) -> UsageRecorder:
        """A recorder writing to the ledger in `redis`, spooling to `spool_dir` (None: no spool, and a
        record that cannot be written fails its request)."""
        return cls(Ledger(redis), Spool(spool_dir) if spool_dir is not None else None)

    async def max_list_price_nusd(self, model: str, prompt_tokens: int, completion_tokens: int, at: float) -> int:
        """The list price of a request of that many tokens at most (all prompt tokens uncached), with the
        prices in force at `at`; 0 when the model has no price."""
        price = (await self.prices.get()).model_price(model, at)
        return price.list_price_nusd(prompt_tokens, 0, completion_tokens) if price else 0

    async def _price(self, record: UsageRecord) -> UsageRecord:
        book: PriceBook | None = self.prices.book
        try:
            book = await self.prices.get()
        except UNREACHABLE:
            if book is None:
                return record  # priced when it is replayed
        return price_record(book, record)

    async def record(self, record: UsageRecord) -> UsageRecord:
        """Prices and writes one record; returns it priced, once it is in the ledger or safe in the spool.

        With no spool configured, an unreachable Redis raises.
        """
        priced = await self._price(record)
        return await self._written(priced, self.ledger.record_soon(priced))

    def priced_now(self, record: UsageRecord) -> UsageRecord | None:
        """The record priced with the book in force, if that is at hand without reading Redis (as it is
        once the process has priced anything in the last minute); else None."""
        book = self.prices.fresh()
        return price_record(book, record) if book is not None else None

    def write_soon(self, priced: UsageRecord) -> Coroutine[Any, Any, UsageRecord]:
        """`record` for a priced record, with the ledger write queued at once (fareway/redis/batch.py).
        Await what it returns."""
        return self._written(priced, self.ledger.record_soon(priced))

    async def _written(self, priced: UsageRecord, writing: Awaitable[bool]) -> UsageRecord:
        try:
            await writing
            self.unreachable = False
            return priced
        except UNREACHABLE as exc:
            self.unreachable = True
            if self.spool is None:
                raise
            log.warning("Redis unreachable (%s); spooling usage of %s to %s", exc, priced.request_id,
                        self.spool.path)
            await asyncio.to_thread(self.spool.append, priced)
            return priced

    async def replay(self) -> int:
        """Writes every spooled record to the ledger; returns how many were new.

        Raises on an unreachable Redis; what was not written stays spooled.
        """
        if self.spool is None:
            return 0
        added = 0
        for path in await asyncio.to_thread(self.spool.take):
            records = await asyncio.to_thread(lambda p=path: list(Spool.read(p)))
            for start in range(0, len(records), _REPLAY_BATCH):
                batch = [await self._price(r) if not r.price_version else r
                         for r in records[start:start + _REPLAY_BATCH]]
                added += await self.ledger.record_many(batch)
            await asyncio.to_thread(path.unlink)
            log.info("replayed %d spooled usage records from %s (%d new)", len(records), path, added)
        return added

    def start_replaying(self, interval_s: float = REPLAY_INTERVAL_S) -> None:
        """Replays the spool now and whenever it has records, in the background."""
        if self.spool is not None and self._replayer is None:
            self._replayer = asyncio.get_running_loop().create_task(self._replay_forever(interval_s))

    async def stop(self) -> None:
        if self._replayer is not None:
            await stop_task(self._replayer)
            self._replayer = None

    async def _replay_forever(self, interval_s: float) -> None:
        while True:
            if self.spool is not None and self.spool.has_pending:
                try:
                    await self.replay()
                except UNREACHABLE as exc:
                    log.info("spool replay waits for Redis: %s", exc)
                except Exception:  # noqa: BLE001 - what was not written stays spooled for the next try
                    log.exception("spool replay failed (retried in %.1f s)", interval_s)
            await asyncio.sleep(interval_s)

