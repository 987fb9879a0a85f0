"""Helpers for long-running service processes."""

from __future__ import annotations

import asyncio
import signal


async def wait_for_shutdown_signal() -> None:
    """Returns on SIGINT or SIGTERM (so services can stop gracefully)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '2GB', '1073741824' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    value = text.strip().lower()
    for suffix, factor in units.items():
        if value.endswith(suffix):
            number = value[: -len(suffix)].strip()
            break
    else:
        number, factor = value, 1
    try:
        result = int(float(number) * factor)
    except (ValueError, OverflowError):  # OverflowError: 'inf', '1e400'
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GiB or a number of bytes)") from None
    if result <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return result
