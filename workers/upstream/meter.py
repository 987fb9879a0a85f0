"""GPU-seconds of an engine Fareway does not drive, from what the worker in front of it observes.

The worker sees every request start, stream and end. Between two consecutive events (a request
starting, a chunk of text arriving, a request ending) the set of requests in flight does not
change; the interval's wall time x the device count is split across them by the work each is
doing, with the native meter's work model (workers/engine/meter.py): a request with no text yet is
computing its prompt (the FLOPs of its whole prefill), one that is generating computes one token at
its context's length. An interval with nothing in flight is idle. So attributed + idle = wall time
x devices, exactly, as for a native worker; what the split cannot know is how the engine really
scheduled its steps (its records say `observed`, not `engine-steps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.engine.meter import WorkModel

METERING = "observed"
"""How these records were metered (usage records' `metering`; a native worker's is "engine-steps")."""


@dataclass(eq=False)
class Flight:
    """One request in flight."""

    prompt_tokens: int
    completion_tokens: int = 0
    gpu_seconds: float = 0.0

    def work(self, model: WorkModel | None) -> float:
        if model is None:   # no model shape known: tokens computed stand for the work
            return float(self.prompt_tokens if not self.completion_tokens else 1)
        if not self.completion_tokens:
            return model.flops(0, max(self.prompt_tokens, 1), True)
        return model.flops(self.prompt_tokens + self.completion_tokens - 1, 1, True)


class ObservedMeter:
    def __init__(self, num_devices: int, work_model: WorkModel | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.num_devices = num_devices
        self.work_model = work_model
        self.clock = clock
        self.attributed_gpu_seconds = 0.0
        self.idle_gpu_seconds = 0.0
        self._flights: list[Flight] = []
        self.started = self._last = clock()
        """When metering began: attributed + idle = (now - started) x devices."""

    @property
    def total_gpu_seconds(self) -> float:
        return self.attributed_gpu_seconds + self.idle_gpu_seconds

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    def totals(self) -> tuple[float, float]:
        """(All device-seconds, of which idle) up to now."""
        self._advance()
        return self.total_gpu_seconds, self.idle_gpu_seconds

    def start(self, prompt_tokens: int) -> Flight:
        self._advance()
        flight = Flight(prompt_tokens)
        self._flights.append(flight)
        return flight

    def progress(self, flight: Flight, completion_tokens: int) -> None:
        """The request has produced `completion_tokens` in all (charged up to now at its earlier work)."""
        self._advance()
        flight.completion_tokens = completion_tokens

    def end(self, flight: Flight) -> float:
        """The request is over; the device-seconds it was charged."""
        self._advance()
        if flight in self._flights:
            self._flights.remove(flight)
        return flight.gpu_seconds

    def _advance(self) -> None:
        now = self.clock()
        device_seconds = max(0.0, now - self._last) * self.num_devices
        self._last = now
        if not self._flights:
            self.idle_gpu_seconds += device_seconds
            return
        work = [flight.work(self.work_model) for flight in self._flights]
        total = sum(work)
        for flight, w in zip(self._flights, work, strict=True):
            flight.gpu_seconds += device_seconds * w / total
        self.attributed_gpu_seconds += device_seconds
