"""Redis, where Fareway's shared state lives: the one place that connects to it and says when it
is unreachable.

- `connect(url)`: the asyncio client every service uses (decoded replies, a command timeout);
  its calls can share round trips through its batcher (batch.py).
- `UNREACHABLE`: the exceptions that mean Redis cannot be reached now (refused, timed out, still
  loading its data). A request that meets one gets UNAVAILABLE, a usage record goes to the spool,
  a background loop tries again next round.
- keys.py builds every key; scripts.py loads the Lua scripts from the packages' `lua/` folders;
  redis_py.py holds what the batcher takes from redis-py beyond its public API; embedded.py runs
  the embedded redis-server when no REDIS_URL is given.
"""

from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions

from fareway.redis.batch import close_batcher

UNREACHABLE: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""Redis cannot be reached now. BusyLoadingError (still loading its data) is a ConnectionError, and
redis-py raises socket errors (OSError) as ConnectionError."""

SOCKET_TIMEOUT_S = 10.0
"""How long a command may wait for Redis's answer before it counts as unreachable (its usage record is
then spooled). Without it, a stalled Redis (a paused process, a dropped route) would hold requests, and
a stopping gateway's last writes, for ever. The URL may set its own (`?socket_timeout=2`)."""


class Redis(aioredis.Redis):
    """An asyncio client whose close also closes the connection of its batcher (batch.py)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        close_batcher(self)
        await super().aclose(close_connection_pool)


def connect(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_timeout=SOCKET_TIMEOUT_S)
