"""The embedded redis-server: clear errors, and nothing left running when it cannot start."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fareway.net import free_port
from fareway.redis.embedded import EmbeddedRedis, is_alive


def test_a_socket_path_over_the_unix_limit_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        EmbeddedRedis(tmp_path, unix_socket=tmp_path / ("x" * 120) / "redis.sock")


def test_a_server_that_cannot_start_is_not_left_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedRedis(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="redis-server exited"):
            server.start()
    assert server._process is None


def test_data_persists_across_restarts(tmp_path: Path) -> None:
    import redis

    port = free_port()
    with EmbeddedRedis(tmp_path, port=port) as server:
        redis.Redis.from_url(server.url).set("kept", "1")
    assert not is_alive(f"redis://127.0.0.1:{port}")
    with EmbeddedRedis(tmp_path, port=port) as server:
        assert redis.Redis.from_url(server.url).get("kept") == b"1"


def test_free_ports_are_bindable_and_outside_the_range_outgoing_connections_take() -> None:
    """A port from the ephemeral range can be taken by any outgoing connection before the server
    meant for it binds it; free_port picks below that range where the kernel says what it is."""
    ports = {free_port() for _ in range(20)}
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 0
    if low > 11_000:  # room below the range (on Linux it starts at 32768 by default)
        assert all(port < low for port in ports)
