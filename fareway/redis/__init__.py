"""Redis, where Fareway's shared state lives: the one place that connects to it and says when it
is unreachable.

- `connect(url)`: the asyncio client every service uses (decoded replies, a command timeout);
  its calls can share round trips through its batcher (batch.py). A Redis Cluster URL gives a
  cluster client (below).
- `UNREACHABLE`: the exceptions that mean Redis cannot be reached now (refused, timed out, still
  loading its data, a cluster that is down). A request that meets one gets UNAVAILABLE, a usage
  record goes to the spool, a background loop tries again next round.
- keys.py builds every key; scripts.py loads the Lua scripts from the packages' `lua/` folders;
  redis_py.py holds what the batcher takes from redis-py beyond its public API; embedded.py runs
  the embedded redis-server when no REDIS_URL is given.

Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...][?option=value...]`
(`rediss+cluster://` over TLS), as Pomerium spells its go-redis cluster URLs. redis-py has no
URL form of its own for a cluster (RedisCluster.from_url takes a plain redis:// URL), and a plain
one cannot tell a cluster from a server. The hosts are seed nodes: the client learns the rest of
the cluster from any of them. The options are redis-py's URL options (`socket_timeout`,
...); a cluster has only database 0, so the URL names none. Every service reads the URL from
REDIS_URL, so one setting moves them all. Every script and transaction touches the keys of one
hash slot (keys.py), as a cluster requires.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, ClusterPubSub
from redis.asyncio.connection import SSLConnection, parse_url

from fareway.redis.batch import close_batcher

UNREACHABLE: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                            redis.exceptions.ClusterDownError, redis.exceptions.SlotNotCoveredError)
"""Redis cannot be reached now. BusyLoadingError (still loading its data) is a ConnectionError, and
redis-py raises socket errors (OSError) as ConnectionError. On a cluster: CLUSTERDOWN (a master down
with no replica to take over) and a slot no node serves; a cluster none of whose seed nodes answers
raises a ConnectionError too (RedisCluster.initialize below)."""

SOCKET_TIMEOUT_S = 10.0
"""How long a command may wait for Redis's answer before it counts as unreachable (its usage record is
then spooled). Without it, a stalled Redis (a paused process, a dropped route) would hold requests, and
a stopping gateway's last writes, for ever. The URL may set its own (`?socket_timeout=2`). On a
cluster every call goes through redis-py, which retries one that timed out (10 times by default): a
stalled node counts as unreachable after about eleven times this."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""A Redis Cluster URL's scheme -> the scheme of its nodes' URLs."""


class Redis(aioredis.Redis):
    """An asyncio client whose close also closes the connection of its batcher (batch.py)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        close_batcher(self)
        await super().aclose(close_connection_pool)


class RedisCluster(aioredis.RedisCluster):
    """An asyncio Redis Cluster client whose close also closes its batcher, whose failure to reach any
    seed node is a ConnectionError (UNREACHABLE), as a single server's would be, and whose pub/sub
    works as its first command."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            if isinstance(exc.__cause__, UNREACHABLE):
                raise redis.exceptions.ConnectionError(str(exc)) from exc
            raise

    def pubsub(self, node: ClusterNode | None = None, host: str | None = None, port: int | None = None,
               **kwargs: Any) -> ClusterPubSub:
        return _ClusterPubSub(self, node=node, host=host, port=port, **kwargs)

    async def aclose(self) -> None:
        close_batcher(self)
        await super().aclose()


class _ClusterPubSub(ClusterPubSub):
    """Learns the cluster's nodes before its first command: redis-py 8.1 looks a channel's node up in the
    client's map of slots, which stays empty (a KeyError) until the client has sent a command."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()
        return await super().execute_command(*args, **kwargs)


Client = Redis | RedisCluster
"""What `connect` returns."""


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """A Redis Cluster URL's seed nodes, (host, port) each, and the options of its connections (user,
    password, TLS, the URL's query), as redis-py's URL parser reads them."""
    scheme, rest = url.split("://", 1)
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"a Redis Cluster URL starts with {' or '.join(f'{s}://' for s in CLUSTER_SCHEMES)}, "
                         f"got {redacted_url(url)!r}")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    user, _, hosts = netloc.rpartition("@")
    if tail.split("?", 1)[0].strip("/"):
        raise ValueError(f"a Redis Cluster has only database 0: leave the path out of {redacted_url(url)!r}")
    nodes = []
    for host_port in hosts.split(","):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"each node of a Redis Cluster URL is host:port, got {host_port!r} in {redacted_url(url)!r}")
        nodes.append((host.strip("[]"), int(port)))
    first = f"{CLUSTER_SCHEMES[scheme]}://{user + '@' if user else ''}{hosts.split(',')[0]}{tail}"
    options: dict[str, Any] = dict(parse_url(first))
    options.pop("host", None)
    options.pop("port", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return nodes, options


def redacted_url(url: str) -> str:
    """The URL as an error may quote it: its password (and user) left out."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("@")
    return f"{scheme}{sep}***@{hosts}" if at and "/" not in userinfo else url


def connect(url: str) -> Client:
    """The client for `url`: redis://, rediss:// or unix:// (one server), or redis+cluster:// or
    rediss+cluster:// (a Redis Cluster, through its seed nodes)."""
    options = {"decode_responses": True, "health_check_interval": 30, "socket_timeout": SOCKET_TIMEOUT_S}
    if not is_cluster_url(url):
        return Redis.from_url(url, **options)
    nodes, url_options = cluster_nodes(url)
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes], **(options | url_options))
