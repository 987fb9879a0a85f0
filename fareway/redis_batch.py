"""Automatic pipelining: the Redis commands a process issues in one turn of its event loop go out
together, in one round trip.

A gateway request makes a few small atomic calls (rate-limit admission, budget reservation, the
usage record, settling its limits). Each alone costs a round trip and, in redis-py, more CPU than
Redis spends running it. Sent through a `Batcher`, the calls that concurrent requests make at
about the same moment share one pipeline (not a transaction: each script stays atomic on its own,
and their order is kept), and one request's independent calls can share one too:

    added, _ = await asyncio.gather(script(keys, args), batcher.command("SADD", key, member))

(both calls return futures at once, so no task is needed to run them side by side).

`batched_script(redis, source)` is a drop-in for `redis.register_script(source)`: called as
`await script(keys=[...], args=[...])`, it returns what the script returns and raises what it
raises. A script Redis does not hold yet (a restart, SCRIPT FLUSH) is loaded and run again.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Arg = str | int | float | bytes


@dataclass
class _Pending:
    args: tuple[Arg, ...]
    future: asyncio.Future[Any]
    script: AsyncScript | None = None


class Batcher:
    """Queues commands and sends what is queued, in order, at the end of the loop's current turn."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queue: list[_Pending] = []
        self._sending: set[asyncio.Task[None]] = set()

    def command(self, *args: Arg) -> asyncio.Future[Any]:
        """Queues a command; the future has its reply."""
        return self._enqueue(_Pending(args, asyncio.get_running_loop().create_future()))

    def evalsha(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queues a call of a registered script; the future has what it returns."""
        return self._enqueue(_Pending(("EVALSHA", script.sha, len(keys), *keys, *args),
                                      asyncio.get_running_loop().create_future(), script))

    def _enqueue(self, pending: _Pending) -> asyncio.Future[Any]:
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append(pending)
        return pending.future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:  # no pipeline's bookkeeping for a lone command
                results = [await _run_one(self._redis, batch[0])]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for pending in batch:
                        pipe.execute_command(*pending.args)
                    results = await pipe.execute(raise_on_error=False)
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, NoScriptError) and pending.script is not None:
                    result = await _run_one(self._redis, pending)
                _resolve(pending.future, result)
        except BaseException as exc:  # the connection failed (or the loop is closing): every caller hears it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise


async def _run_one(redis: aioredis.Redis, pending: _Pending) -> Any:
    try:
        if pending.script is not None:
            numkeys = int(pending.args[2])
            keys, args = pending.args[3:3 + numkeys], pending.args[3 + numkeys:]
            return await pending.script(keys=list(keys), args=list(args))  # loads the script if Redis lacks it
        return await redis.execute_command(*pending.args)
    except Exception as exc:  # noqa: BLE001 - handed to the caller, as a pipeline would
        return exc


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the caller stopped waiting (cancelled)
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


_BATCHERS: weakref.WeakKeyDictionary[aioredis.Redis, Batcher] = weakref.WeakKeyDictionary()


def batcher_for(redis: aioredis.Redis) -> Batcher:
    """The client's batcher (one per client, so everything sent through the client shares it)."""
    batcher = _BATCHERS.get(redis)
    if batcher is None:
        batcher = _BATCHERS[redis] = Batcher(redis)
    return batcher


class BatchedScript:
    """A Lua script whose calls go through the client's batcher."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.script = redis.register_script(source)
        self._batcher = batcher_for(redis)

    @property
    def sha(self) -> str:
        return self.script.sha

    def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = (),
                 client: aioredis.Redis | None = None) -> Awaitable[Any]:
        if client is not None:  # an explicit pipeline: queue it there, as a plain script would
            return self.script(keys=list(keys), args=list(args), client=client)
        return self._batcher.evalsha(self.script, keys, args)


def batched_script(redis: aioredis.Redis, source: str) -> BatchedScript:
    return BatchedScript(redis, source)
