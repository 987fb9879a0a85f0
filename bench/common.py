"""What every benchmark shares: the machine's own limits, measured in the run,
and the output format (a table, then one JSON object as the last line)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from rich.console import Console
from rich.table import Table

T = TypeVar("T")


DEVICE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-device")
"""Every tensor operation of a benchmark, ours and the baseline's, runs on this one thread (pass it
to the Worker as its device thread): a second thread doing OpenMP work would make libgomp stop
spinning between parallel regions and slow whichever side runs (see `Worker`)."""


def on_device(fn: Callable[..., T], *args: object) -> T:
    return DEVICE_THREAD.submit(fn, *args).result()


@contextmanager
def engines_paused(*workers: object) -> Iterator[None]:
    """Stops the workers' engine loops so the device thread is free for a baseline, then restarts them."""
    for worker in workers:
        worker.engine.stop()
    try:
        yield
    finally:
        for worker in workers:
            worker.start()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_read_gb_per_s(num_bytes: int = 256 << 20, repeats: int = 7) -> float:
    """Streaming read bandwidth as torch sees it: a sum over a buffer far larger than the caches."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    data.sum()
    return num_bytes / median_seconds(data.sum, repeats) / 1e9


def matmul_gflop_per_s(size: int = 1024, repeats: int = 7) -> float:
    """This CPU's fp32 matrix-multiply rate: the faster of MKL's `a @ b` and oneDNN's
    prepacked linear (the kernel the worker runs), on square matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    kernels = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    rates = []
    for kernel in kernels:
        kernel()
        rates.append(2 * size**3 / median_seconds(kernel, repeats) / 1e9)
    return max(rates)


def print_results(title: str, rows: list[tuple[str, str]], figures: dict[str, object]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    print(json.dumps(figures, sort_keys=False))
