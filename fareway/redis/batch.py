"""Automatic pipelining: the Redis commands a process issues in one turn of its event loop go out
together, in one round trip.

A gateway request makes a few small atomic calls (rate-limit admission, budget reservation, the
usage record, settling its limits). Each alone costs a round trip and, in redis-py, more CPU than
Redis spends running it. Sent through a `Batcher`, the calls that concurrent requests make at
about the same moment share one write (not a transaction: each script stays atomic on its own,
and their order is kept), and one request's independent calls can share one too:

    added, _ = await asyncio.gather(script(keys, args), batcher.command("SADD", key, member))

(both calls return futures at once, so no task is needed to run them side by side).

The batcher keeps a connection of its own. redis-py opens it, in RESP2 (so the client's user,
password, database, TLS and socket options apply), then the batcher drives the socket itself: each
batch goes out in one write, and hiredis parses the replies as they arrive, resolving the callers'
futures in order. What that takes of redis-py's private parts is in fareway/redis/redis_py.py, with
the versions it was written for. Two script calls in one round trip cost about 70 us of CPU this way against
160 us through a redis-py pipeline (pool checkout, a task per batch, a parser call per reply). The
client's `socket_timeout` bounds each batch's wait; a lost connection fails its waiting callers with
a ConnectionError, and the next batch opens a new one. Where a connection has no asyncio transport
to take over, the client is a Redis Cluster client, or redis-py is a version the adapter was not
written for, batches go through redis-py pipelines, one after another (the batches flushed while one
is out go together in the next). A cluster pipeline sends each node its share of a batch, every node
at once, each node's calls in order; the calls whose order matters share a hash slot (a request_id's
claim and the request's admission are both its team's: keys.py), hence a node. Either way a call
reaches Redis after every call made before it through the batcher (on a cluster: every call made
before it to the same slot), even while its connection opens (a request_id's claim before the
admission that counts the request only for the claim's owner).

`batched_script(redis, source)` is a drop-in for `redis.register_script(source)`: called as
`await script(keys=[...], args=[...])`, it returns what the script returns and raises what it
raises. Each connection sends a script's source (SCRIPT LOAD) right ahead of its first call, so calls
keep their order across batches, however new the Redis (through pipelines: the batcher loads each
script, on every node of a cluster, before the first batch that calls it). A script Redis forgets while
the connection stays open (SCRIPT FLUSH, a replica promoted) is loaded and run again, after the calls
sent behind it (such calls keep their order among themselves), and its source goes ahead of its next
call again.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fareway.redis import redis_py

Arg = str | int | float | bytes


@dataclass
class _Pending:
    args: tuple[Arg, ...]
    future: asyncio.Future[Any] | None
    """None for a SCRIPT LOAD the link sends ahead of a script's first call on it (nobody waits on it)."""
    script: AsyncScript | None = None


class Batcher:
    """Queues commands and sends what is queued, in order, at the end of the loop's current turn."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._client = weakref.ref(redis)
        """Not a strong reference: the batcher lives as long as its client (`batcher_for`)."""
        self._queue: list[_Pending] = []
        self._link: _Link | None = None
        self._linking: asyncio.Task[_Link | None] | None = None
        self._reloading: collections.deque[_Pending] = collections.deque()
        self._is_direct = redis_py.is_supported() and not isinstance(redis, aioredis.RedisCluster)
        """False where the client's connections cannot be driven directly: redis-py pipelines then (a
        cluster's pipelines route each command to its slot's node, and follow the cluster as it changes)."""
        self._loaded: set[str] = set()
        """Scripts loaded (SCRIPT LOAD) ahead of their first batch through pipelines."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsent: list[list[_Pending]] = []
        """Batches flushed while no connection was open (or while earlier ones waited), oldest first."""
        self._sender: asyncio.Task[None] | None = None
        self.num_round_trips = 0
        """Batches sent (each one write and its replies): what the batching saves shows here."""

    def command(self, *args: Arg) -> asyncio.Future[Any]:
        """Queues a command; the future has its reply."""
        return self._enqueue(_Pending(args, asyncio.get_running_loop().create_future()))

    def evalsha(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queues a call of a registered script; the future has what it returns."""
        return self._enqueue(_Pending(("EVALSHA", script.sha, len(keys), *keys, *args),
                                      asyncio.get_running_loop().create_future(), script))

    @property
    def _redis(self) -> aioredis.Redis:
        client = self._client()
        if client is None:
            raise RedisConnectionError("the Redis client of this batcher was closed and collected")
        return client

    def close(self) -> None:
        """Closes the batcher's connection (a later call opens another)."""
        self._loaded.clear()
        if self._link is not None:
            self._link.close()
            self._link = None

    def _enqueue(self, pending: _Pending) -> asyncio.Future[Any]:
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append(pending)
        return pending.future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        self.num_round_trips += 1
        loop = asyncio.get_running_loop()
        if self._sender is not None and self._sender.get_loop() is not loop:
            self._sender, self._unsent = None, []  # left by a loop that stopped: their callers went with it
        link = self._link
        if not self._unsent and link is not None and link.is_open and link.loop is loop:
            link.send(batch)
            return
        # Behind the batches still waiting, so that every call reaches Redis after those made before it.
        self._unsent.append(batch)
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_unsent())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_unsent(self) -> None:
        """Sends the waiting batches in order: all at once when a connection opens; through redis-py
        pipelines where it cannot be driven directly, the batches waiting together, then those flushed
        meanwhile."""
        while self._unsent:
            try:
                link = await self._linked() if self._is_direct else None
                if link is not None and link.is_open:
                    batches, self._unsent = self._unsent, []
                    for batch in batches:
                        link.send(batch)
                    return
                num_sending = len(self._unsent)
                await self._send_pipelined([pending for batch in self._unsent[:num_sending] for pending in batch])
                del self._unsent[:num_sending]  # taken off once sent: later flushes queue behind them
            except BaseException as exc:  # the connection failed (or the loop is closing): every caller hears it
                batches, self._unsent = self._unsent, []
                error = exc if isinstance(exc, Exception) else RedisConnectionError(str(exc))
                for batch in batches:
                    for pending in batch:
                        _resolve(pending.future, error)
                if not isinstance(exc, Exception):
                    raise
                return

    async def _linked(self) -> _Link | None:
        """The open connection, opened if need be (batches flushed meanwhile wait for the same one);
        None where the client's connections cannot be driven directly."""
        loop = asyncio.get_running_loop()
        if self._link is not None and self._link.is_open and self._link.loop is loop:
            return self._link
        if self._linking is None or self._linking.get_loop() is not loop:
            self._linking = loop.create_task(_open_link(self._redis, self._reload))
        linking = self._linking
        try:
            link = await linking
        finally:
            if self._linking is linking and linking.done():
                self._linking = None
        if link is None:
            self._is_direct = False
            return None
        if self._link is not None and self._link is not link:
            self._link.close()
        self._link = link
        return link

    def _reload(self, pending: _Pending) -> None:
        """Runs a script Redis no longer holds through redis-py, which loads it first; such calls run
        one after another, in the order they were made."""
        self._reloading.append(pending)
        if len(self._reloading) == 1:
            self._spawn(self._reload_in_order())

    async def _reload_in_order(self) -> None:
        try:
            while self._reloading:
                pending = self._reloading[0]
                _resolve(pending.future, await _run_one(self._redis, pending))
                self._reloading.popleft()
        finally:
            while self._reloading:  # cancelled: the loop is closing
                _resolve(self._reloading.popleft().future, RedisConnectionError("the Redis batcher stopped"))

    async def _send_pipelined(self, batch: list[_Pending]) -> None:
        # An argument Redis has no encoding for fails its own call here, as on a link: in a pipeline it
        # would fail the whole batch.
        batch = [pending for pending in batch if _packed(pending) is not None]
        scripts = {p.script.sha: p.script for p in batch if p.script is not None and p.script.sha not in self._loaded}
        for sha, script in scripts.items():  # a cluster loads it on every primary
            await self._redis.script_load(script.script)
            self._loaded.add(sha)
        if not batch:
            return
        if len(batch) == 1:  # no pipeline's bookkeeping for a lone command
            results = [await _run_one(self._redis, batch[0])]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for pending in batch:
                    pipe.execute_command(*pending.args)
                results = await pipe.execute(raise_on_error=False)
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError) and pending.script is not None:
                self._loaded.discard(pending.script.sha)  # forgotten: loaded again ahead of its next batch
                result = await _run_one(self._redis, pending)
            _resolve(pending.future, result)


class _Link(asyncio.Protocol):
    """A connection whose replies are parsed as they arrive and handed, in order, to the futures of
    the commands that were sent."""

    def __init__(self, socket: redis_py.Socket, callbacks: Mapping[str, Callable[..., Any]],
                 reload: Callable[[_Pending], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self._socket = socket
        self._transport = transport = socket.transport
        self._reader = hiredis.Reader(encoding=socket.encoding) if socket.encoding else hiredis.Reader()
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._timeout_s = socket.timeout_s
        self._callbacks = callbacks
        self._reload = reload
        self._num_sent = self._num_answered = 0
        self._loaded: set[str] = set()
        """Scripts this connection has sent Redis (SCRIPT LOAD) ahead of their calls."""
        self._failure: Exception | None = None
        self.is_open = True
        transport.set_protocol(self)

    def send(self, batch: list[_Pending]) -> None:
        packed = []
        for pending in batch:
            command = _packed(pending)
            if command is None:
                continue
            if pending.script is not None and pending.script.sha not in self._loaded:
                # A script's first call on a connection goes right behind its source. A call that came back
                # NOSCRIPT would be rerun after calls sent later, which must not overtake it: a request's
                # settlement, its caller's next admission.
                self._loaded.add(pending.script.sha)
                packed.append(hiredis.pack_command(("SCRIPT", "LOAD", pending.script.script)))
                self._waiting.append(_Pending(("SCRIPT", "LOAD"), None))
            packed.append(command)
            self._waiting.append(pending)
        self._transport.write(b"".join(packed))
        self._num_sent += len(packed)
        if self._timeout_s is not None:
            self.loop.call_later(self._timeout_s, self._check_answered, self._num_sent)

    def close(self) -> None:
        if self.is_open:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                self._num_answered += 1
                self._answer(self._waiting.popleft(), reply)
        except Exception as exc:  # noqa: BLE001 - garbage, a reply nobody asked for, text that is not UTF-8
            self._fail(RedisConnectionError(f"Redis sent an unreadable reply: {exc!r}"))

    def _answer(self, pending: _Pending, reply: Any) -> None:
        if pending.future is None:  # a script loaded ahead: its call reports any failure
            return
        if isinstance(reply, hiredis.ReplyError):
            error = redis_py.parse_error(str(reply))
            if isinstance(error, NoScriptError) and pending.script is not None:
                # Redis forgot it (SCRIPT FLUSH): the call is rerun through redis-py, and the next call
                # on this connection sends the source ahead again.
                self._loaded.discard(pending.script.sha)
                self._reload(pending)
                return
            _resolve(pending.future, error)
            return
        callback = self._callbacks.get(str(pending.args[0]).upper()) if pending.script is None else None
        _resolve(pending.future, callback(reply) if callback is not None else reply)

    def _check_answered(self, num_sent: int) -> None:
        if self.is_open and self._num_answered < num_sent:
            self._fail(RedisTimeoutError(f"Redis did not answer within {self._timeout_s} s"))

    def _fail(self, error: Exception) -> None:
        self._failure = error
        self._transport.abort()  # connection_lost follows, and fails every waiting caller

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        error = self._failure or RedisConnectionError(f"Connection to Redis lost: {exc or 'closed'}")
        while self._waiting:
            _resolve(self._waiting.popleft().future, error)


async def _open_link(redis: aioredis.Redis, reload: Callable[[_Pending], None]) -> _Link | None:
    """A connection opened (and authenticated) by redis-py, then driven by a _Link; None where that
    cannot be (a connection without an asyncio stream transport underneath)."""
    socket = await redis_py.open_socket(redis)
    if socket is None:
        return None
    legacy = redis.connection_pool.connection_kwargs.get("legacy_responses", True)
    return _Link(socket, redis_py.reply_callbacks(legacy), reload)


async def _run_one(redis: aioredis.Redis, pending: _Pending) -> Any:
    try:
        if pending.script is not None:
            numkeys = int(pending.args[2])
            keys, args = pending.args[3:3 + numkeys], pending.args[3 + numkeys:]
            return await pending.script(keys=list(keys), args=list(args))  # loads the script if Redis lacks it
        return await redis.execute_command(*pending.args)
    except Exception as exc:  # noqa: BLE001 - handed to the caller, as a pipeline would
        return exc


def _packed(pending: _Pending) -> bytes | None:
    """The command in RESP; None, its caller told, for an argument Redis has no encoding for (None, a
    bool), which must not fail the calls sent with it."""
    try:
        return hiredis.pack_command(pending.args)
    except TypeError as exc:
        _resolve(pending.future, DataError(f"cannot send {pending.args[0]!r} to Redis: {exc}"))
        return None


def _resolve(future: asyncio.Future[Any] | None, result: Any) -> None:
    if future is None or future.done():  # nobody waits for it (a SCRIPT LOAD), or the caller stopped waiting
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


_BATCHERS: weakref.WeakKeyDictionary[aioredis.Redis, Batcher] = weakref.WeakKeyDictionary()


def batcher_for(redis: aioredis.Redis) -> Batcher:
    """The client's batcher (one per client, so everything sent through the client shares it). It
    lives as long as the client; `close_batcher` closes its connection."""
    batcher = _BATCHERS.get(redis)
    if batcher is None:
        batcher = _BATCHERS[redis] = Batcher(redis)
    return batcher


def close_batcher(redis: aioredis.Redis) -> None:
    batcher = _BATCHERS.get(redis)
    if batcher is not None:
        batcher.close()


class BatchedScript:
    """A Lua script whose calls go through the client's batcher."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.script = redis.register_script(source)
        self._batcher = batcher_for(redis)

    @property
    def sha(self) -> str:
        return self.script.sha

    def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = (),
                 client: aioredis.Redis | ClusterPipeline | None = None) -> Awaitable[Any]:
        if isinstance(client, ClusterPipeline):  # which takes EVALSHA only as a raw command: the caller loads it
            client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            return _queued(client)  # not the pipeline itself: awaiting a cluster pipeline empties it
        if client is not None:  # an explicit pipeline: queue it there, as a plain script would
            return self.script(keys=list(keys), args=list(args), client=client)
        return self._batcher.evalsha(self.script, keys, args)


async def _queued(pipeline: ClusterPipeline) -> ClusterPipeline:
    return pipeline


def batched_script(redis: aioredis.Redis, source: str) -> BatchedScript:
    return BatchedScript(redis, source)
