"""The ranks that together hold one replica of the model, and what they say to
each other outside the model's own all-reduces.

Rank 0 runs the engine and drives the others: every step it broadcasts the
step's inputs (`send_step`); the other ranks wait for them (`receive_step`) and
run the same forward pass. Step messages travel over a gloo group on the CPU,
so a rank waiting through an idle hour spins no device; the payload and the
model's all-reduces use the device's backend (gloo on CPU, NCCL/RCCL on GPUs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from workers.parallel.step import HEADER_LEN, PREFILL_LEN, STOP, StepInputs, describe, payload, stop_header, unpack

log = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {"cpu": "gloo", "cuda": "nccl"}
"""torch.distributed backend of the model's collectives, by device type (ROCm's RCCL answers to "nccl")."""

COLLECTIVE_TIMEOUT = timedelta(seconds=60)
"""How long rank 0 waits on the others in any collective: a rank that stops answering fails the worker."""
_IDLE_TIMEOUT = timedelta(days=365)
"""How long the other ranks wait for rank 0's next step (rank 0's exit ends the wait at once)."""

FailureCallback = Callable[[str], None]


class RankProcesses(Protocol):
    """Rank 0's handle on ranks it started itself."""

    def stop(self) -> None:
        """Waits briefly for the ranks to exit, then kills those left."""

    def kill(self) -> None:
        """Kills every rank still running."""


class RankGroup:
    """This process's place among the ranks of one model replica.

    A world of one is a plain single-device runner: its collectives do nothing.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device,
                 step_group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        """This rank's device (cuda:<local rank> on GPUs)."""
        self._step_group = step_group
        self._processes: RankProcesses | None = None
        self._lock = threading.Lock()
        self._callbacks: list[FailureCallback] = []
        self._failure: str | None = None
        self._closing = False

    @property
    def failure(self) -> str | None:
        """Why the group broke, or None while it works."""
        return self._failure

    @property
    def is_closing(self) -> bool:
        return self._closing

    def adopt(self, processes: RankProcesses) -> None:
        """Rank 0: the other ranks are processes it started; `close` and `fail` stop them."""
        self._processes = processes

    def on_failure(self, callback: FailureCallback) -> None:
        """Calls `callback(reason)` once if the group breaks (from whichever thread notices)."""
        with self._lock:
            if self._failure is None:
                self._callbacks.append(callback)
                return
        callback(self._failure)

    def fail(self, reason: str) -> None:
        """Marks the group broken: the other ranks are stopped and the callbacks told (once)."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = reason
            callbacks, self._callbacks = self._callbacks, []
        log.error("tensor-parallel group broken: %s", reason)
        if self._processes is not None:
            self._processes.kill()
        for callback in callbacks:
            callback(reason)

    def min(self, value: int) -> int:
        """The smallest of the ranks' values (each rank calls this with its own)."""
        return self._all_reduce(value, dist.ReduceOp.MIN)

    def sum(self, value: int) -> int:
        """The sum of the ranks' values (each rank calls this with its own)."""
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def of_rank0(self, value: int) -> int:
        """Rank 0's value (each rank calls this with its own)."""
        return self._all_reduce(value if self.rank == 0 else 0, dist.ReduceOp.SUM)

    def _all_reduce(self, value: int, op: dist.ReduceOp) -> int:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=op, group=self._step_group)
        return int(tensor.item())

    def send_step(self, step: StepInputs) -> None:
        """Rank 0: broadcasts the step's inputs to the other ranks, before its own forward pass."""
        if self.world_size == 1:
            return
        if self._failure is not None:
            raise RuntimeError(f"the tensor-parallel group is broken: {self._failure}")
        description = describe(step)
        try:
            dist.broadcast(description[:HEADER_LEN], src=0, group=self._step_group)
            if description.numel() > HEADER_LEN:
                dist.broadcast(description[HEADER_LEN:], src=0, group=self._step_group)
            dist.broadcast(payload(step), src=0)
        except RuntimeError as exc:
            self.fail(f"broadcasting a step failed: {exc}")
            raise

    def receive_step(self) -> StepInputs | None:
        """The other ranks: the next step's inputs, or None when rank 0 stops the group."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self._step_group)
        description = header.tolist()
        kind, num_prefills, payload_len = description[0], description[5], description[6]
        if kind == STOP:
            return None
        if num_prefills:
            slices = torch.empty(num_prefills * PREFILL_LEN, dtype=torch.int64)
            dist.broadcast(slices, src=0, group=self._step_group)
            description += slices.tolist()
        data = torch.empty(payload_len, dtype=torch.int64, device=self.device)
        dist.broadcast(data, src=0)
        return unpack(description, data)

    def close(self) -> None:
        """Rank 0 stops the other ranks (they leave `receive_step`); every rank leaves the process group."""
        if self.world_size == 1:
            return
        self._closing = True
        if self.rank == 0 and self._failure is None:
            try:
                dist.broadcast(stop_header(), src=0, group=self._step_group)
            except RuntimeError as exc:
                log.warning("could not tell the other ranks to stop: %s", exc)
        if self._processes is not None:
            self._processes.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def join_group(rank: int, world_size: int, device: torch.device, store: dist.Store | None = None) -> RankGroup:
    """Joins the process group of `world_size` ranks as `rank`, on `device`; they meet at `store`,
    or where torchrun's environment (MASTER_ADDR, MASTER_PORT) says."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type], init_method=None if store else "env://", store=store,
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    step_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT if rank == 0 else _IDLE_TIMEOUT)
    return RankGroup(rank, world_size, device, step_group)
