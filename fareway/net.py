"""Ports for the servers that tests and benchmarks start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PICKED_PORT = 10_000
_PORT_PICKER = random.SystemRandom()  # not the global generator, which a test may have seeded


def free_port() -> int:
    """A TCP port that was free a moment ago (for test and benchmark servers that need a port up front).

    It is picked below the kernel's ephemeral range where that range can be read: a port from inside
    it can be taken by any outgoing connection (a gRPC channel, a Redis client) before the server
    that was meant to bind it starts, which lost a benchmark its gateway once.
    """
    try:
        ephemeral_low = int(_EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    for _ in range(100 if ephemeral_low > _LOWEST_PICKED_PORT + 1000 else 0):
        port = _PORT_PICKER.randrange(_LOWEST_PICKED_PORT, ephemeral_low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
