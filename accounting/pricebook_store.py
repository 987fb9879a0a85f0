"""Price book versions in Redis, and the cached copy each recording process prices with.

  fw:pricebook:versions   version -> the price book (JSON); versions are immutable
  fw:pricebook:current    the version in force

Loading a version that would change any price in force before now plus a
notice period is refused: usage already recorded keeps its price, and every
process's cached copy (refreshed more often than the notice period) has the
new prices before they apply.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook
from fareway.redis import keys

PRICE_CHANGE_NOTICE_S = 120.0
"""A new price may take effect this long after it is loaded, at the earliest."""
REFRESH_S = 30.0
"""How often a process re-reads the current version; shorter than the notice period."""


class PriceBookError(ValueError):
    pass


class PriceBookStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def current(self) -> PriceBook | None:
        version = await self._redis.get(keys.PRICE_BOOK_CURRENT)
        return await self.version(version) if version is not None else None

    async def version(self, version: str) -> PriceBook | None:
        text = await self._redis.hget(keys.PRICE_BOOK_VERSIONS, version)
        return PriceBook.from_json(text) if text is not None else None

    async def versions(self) -> list[str]:
        return sorted(await self._redis.hkeys(keys.PRICE_BOOK_VERSIONS))

    async def load(self, book: PriceBook, now: float | None = None) -> None:
        """Makes `book` the version in force; refuses one that would reprice the past."""
        now = time.time() if now is None else now
        stored = await self.version(book.version)
        if stored is not None and stored != book:
            raise PriceBookError(f"price book version {book.version!r} is already loaded with other prices; "
                                 "give the new prices a new version")
        current = await self.current()
        if current is not None and current.version != book.version:
            horizon = now + PRICE_CHANGE_NOTICE_S
            if current.prices_before(horizon) != book.prices_before(horizon):
                raise PriceBookError(
                    f"price book {book.version!r} changes prices in force before "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(horizon))}: usage already recorded "
                    f"keeps its prices. Keep every entry of {current.version!r} that takes effect before then, and "
                    f"give new prices an effective_from at least {PRICE_CHANGE_NOTICE_S:.0f} s from now")
        # The version, then the pointer to it, one after the other (they lie in different Redis Cluster
        # slots): the current version is always stored, and one a failure left stored but not current is
        # loaded again by the next try (versions are immutable).
        await self._redis.hset(keys.PRICE_BOOK_VERSIONS, book.version, book.to_json())
        await self._redis.set(keys.PRICE_BOOK_CURRENT, book.version)

    async def ensure(self, default: PriceBook | None = None) -> PriceBook:
        """The current price book, loading the default one first if none is."""
        current = await self.current()
        if current is not None:
            return current
        book = default or PriceBook.load(DEFAULT_PRICE_BOOK)
        # SET NX: two processes starting together agree on one first version.
        await self._redis.hsetnx(keys.PRICE_BOOK_VERSIONS, book.version, book.to_json())
        await self._redis.set(keys.PRICE_BOOK_CURRENT, book.version, nx=True)
        return await self.current() or book


class PriceBookCache:
    """The current price book for a process that records usage, re-read every REFRESH_S."""

    def __init__(self, store: PriceBookStore, refresh_s: float = REFRESH_S) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._book: PriceBook | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def book(self) -> PriceBook | None:
        """The last book read (None before the first read)."""
        return self._book

    def fresh(self) -> PriceBook | None:
        """The book, if read within the refresh interval (what `get` would return without reading)."""
        if self._book is None or time.monotonic() - self._read_at > self._refresh_s:
            return None
        return self._book

    async def get(self) -> PriceBook:
        if self._book is None or time.monotonic() - self._read_at > self._refresh_s:
            async with self._lock:
                if self._book is None or time.monotonic() - self._read_at > self._refresh_s:
                    self._book = await self._store.ensure()
                    self._read_at = time.monotonic()
        return self._book
