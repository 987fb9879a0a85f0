"""Latency sampling for benchmarks that run no model in their own process (so no torch import):
the sides called in alternating order, and percentiles of what they took."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (0-1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def alternating(calls: dict[str, Callable[[], Awaitable[object]]], samples: int,
                      warmups: int) -> dict[str, list[float]]:
    """Milliseconds each call took, `samples` times each, after `warmups` rounds of all of them. Each
    round rotates the order, so every side goes first, second, ... in turn and none gains from the
    machine's drift."""
    for _ in range(warmups):
        for call in calls.values():
            await call()
    out: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(samples):
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            began = time.perf_counter()
            await calls[name]()
            out[name].append((time.perf_counter() - began) * 1000)
    return out
