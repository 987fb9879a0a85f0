"""Everything Fareway takes from redis-py beyond its public API, in one place.

The batcher (fareway/redis/batch.py) sends each round trip's commands in one write and parses the
replies with hiredis as they arrive. For that it needs three things redis-py keeps private:

- a connection opened and authenticated by redis-py (user, password, database, TLS and socket
  options as the client's URL says), whose socket it then drives itself;
- redis-py's mapping of an error reply to its exception class (NOSCRIPT -> NoScriptError, ...);
- redis-py's reply callbacks (SET -> True, ...), so that a batched command answers as the client's.

Private parts may change in any release, so this module states the redis-py versions it was
written for (`SUPPORTED_VERSIONS`; pyproject.toml bounds the dependency to them) and the batcher
uses none of it on another version: it then sends its batches through public redis-py pipelines,
slower but correct, and says so once in the log. tests/fareway/test_redis_py.py fails on such a
version, naming it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ((8, 1),)
"""redis-py (major, minor) releases this adapter was written for and tested with."""


class UnsupportedRedisPy(RuntimeError):
    """The installed redis-py is not one this adapter was written for."""


def check_version(version: str | None = None) -> None:
    """Raises UnsupportedRedisPy, naming the versions supported, unless `version` (by default the
    installed redis-py's) is one of them."""
    version = redis.__version__ if version is None else version
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor not in SUPPORTED_VERSIONS:
        supported = ", ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_VERSIONS)
        raise UnsupportedRedisPy(
            f"fareway/redis/redis_py.py was written for redis-py {supported}, not {version}: check the private "
            "parts it uses against this release, then add it to SUPPORTED_VERSIONS and to pyproject.toml")


@functools.cache
def is_supported() -> bool:
    """Whether the installed redis-py is one of SUPPORTED_VERSIONS (asked once; logs why not)."""
    try:
        check_version()
    except UnsupportedRedisPy as exc:
        log.warning("%s; Redis calls are batched through redis-py pipelines meanwhile (slower)", exc)
        return False
    return True


@dataclass(frozen=True)
class Socket:
    """A connection redis-py opened, now the caller's to drive."""

    transport: asyncio.Transport
    encoding: str | None
    """Replies are decoded with it (the client's decode_responses); None: bytes."""
    timeout_s: float | None
    """The client's socket_timeout: how long a reply may take."""
    keepalive: object
    """Hold it as long as the transport: redis-py's stream writer closes the transport when collected."""


async def open_socket(client: aioredis.Redis) -> Socket | None:
    """A connection opened and authenticated by redis-py with the client's options, in RESP2 (the
    protocol hiredis parses here); None where it has no asyncio stream transport to take over."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "protocol": 2}
    connection = pool.connection_class(**kwargs)
    await connection.connect()
    writer = getattr(connection, "_writer", None)
    transport = getattr(writer, "transport", None)
    if not isinstance(transport, asyncio.Transport):
        await connection.disconnect()
        return None
    connection._reader = connection._writer = None  # the socket is the caller's now: redis-py must not close it
    encoding = kwargs.get("encoding", "utf-8") if kwargs.get("decode_responses") else None
    return Socket(transport, encoding, kwargs.get("socket_timeout"), writer)


def parse_error(message: str) -> Exception:
    """The redis-py exception for an error reply's text ("NOSCRIPT ..." -> NoScriptError)."""
    from redis._parsers.base import BaseParser

    return BaseParser.parse_error(message)


def reply_callbacks(legacy_responses: bool = True) -> Mapping[str, Callable[..., Any]]:
    """Command name (any case) -> how redis-py turns its RESP2 reply into the value it returns."""
    from redis._parsers.helpers import get_response_callbacks
    from redis.client import CaseInsensitiveDict

    return CaseInsensitiveDict(get_response_callbacks(user_protocol=2, legacy_responses=legacy_responses))
