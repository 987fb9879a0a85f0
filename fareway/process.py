"""Helpers for long-running service processes: stopping on a signal, stopping background tasks."""

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


async def stop_task(task: asyncio.Task, retry_s: float = 0.5) -> None:
    """Cancels `task` and waits until it has ended, cancelling again every `retry_s`.

    One cancel is not always enough: redis-py can swallow a cancel that lands while one of its
    reads runs under a timeout (redis/redis-py#2028, #2551), and the task then runs on, e.g. into
    a pub/sub listen that never returns. An exception the task ended with is raised here.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled():
        task.result()
