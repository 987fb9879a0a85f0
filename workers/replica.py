"""What the registry heartbeat (workers/heartbeat.py) and the device-time reporter
(workers/capacity_reporter.py) read of a worker, whichever engine runs its requests: Fareway's own
(workers/worker.py) or an engine it fronts (workers/upstream/)."""

from __future__ import annotations

from typing import Protocol

from workers.engine.llm_engine import LoadSnapshot


class Replica(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def hardware_class(self) -> str:
        """What its device time is priced by: "cpu", "nvidia-h100", ..."""

    @property
    def num_devices(self) -> int: ...

    @property
    def tensor_parallel_size(self) -> int: ...

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens its KV cache holds at once (0: not known)."""

    @property
    def metering(self) -> str:
        """How its device time is split across requests: "engine-steps" or "observed"."""

    def load(self) -> LoadSnapshot:
        """Its load and its device time so far."""

    def device_seconds(self) -> tuple[float, float]:
        """(All device-seconds since it started, of which idle): attributed + idle = wall x devices."""
