"""Reports the worker's device time to accounting: every few seconds, the
device-seconds its engine metered since the last report, and how many of
them were idle (accounting/capacity.py prices the idle part)."""

from __future__ import annotations

import asyncio
import logging
import time

from accounting.recorder import CapacityStore, WorkerInfo
from fareway.process import stop_task
from fareway.redis import UNREACHABLE
from workers.replica import Replica

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 10.0


class CapacityReporter:
    def __init__(self, worker: Replica, store: CapacityStore, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.worker = worker
        self.store = store
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[float, int, int] | None = None
        """(wall time, cumulative device ns, cumulative idle ns) at the last report."""
        self._pending = (0, 0)
        """Device and idle ns metered but not yet written (Redis was unreachable)."""

    def _totals(self) -> tuple[int, int]:
        total, idle = self.worker.device_seconds()
        return round(total * 1e9), round(idle * 1e9)

    async def start(self) -> None:
        w = self.worker
        await self.store.register(WorkerInfo(w.worker_id, w.hardware_class, w.num_devices, w.model_name,
                                             w.metering))
        self._last = (time.time(), *self._totals())
        self._task = asyncio.get_running_loop().create_task(self._report_forever())

    async def report(self) -> None:
        """Writes the device time metered since the last report."""
        if self._last is None:
            raise RuntimeError("start() the reporter first")
        now = time.time()
        device_total, idle_total = self._totals()
        last_time, last_device, last_idle = self._last
        device = device_total - last_device + self._pending[0]
        idle = idle_total - last_idle + self._pending[1]
        self._last = (now, device_total, idle_total)
        try:
            await self.store.add(self.worker.worker_id, last_time, now, device, idle)
            self._pending = (0, 0)
        except UNREACHABLE as exc:
            # Kept and added to the next report: device time is late, never lost while the worker runs.
            self._pending = (device, idle)
            log.warning("could not report device time to Redis: %s", exc)

    async def stop(self) -> None:
        """Stops reporting after a last report (call after the engine has stopped)."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        if self._last is not None:
            await self.report()

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.report()
            except Exception:  # noqa: BLE001 - the time stays pending and goes with the next report
                log.exception("device time report failed (retried in %.1f s)", self.interval_s)
