"""Starting the ranks of a tensor-parallel worker.

The worker process is rank 0. It spawns ranks 1..N-1 as child processes that
meet it at a TCPStore on a free localhost port; the checkpoint is loaded once
and its tensors reach the children through shared memory. Each child runs the
`follower` it is given (workers/model_runner.py's `follow`: build its shard of
the model and its share of the KV cache, then run the steps rank 0 broadcasts
until rank 0 stops it).

A rank's death is never waited out: rank 0 watches its children and breaks the
group as soon as one exits (the worker then stops serving), and a child exits
as soon as its parent does.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing

from workers.config import RunnerConfig
from workers.hardware import rank_device
from workers.loader.checkpoint import Checkpoint
from workers.parallel.group import RankGroup, join_group
from workers.parallel.sharding import check_shardable

Follower = Callable[[Checkpoint, RunnerConfig, RankGroup], None]
"""What a spawned rank runs once it joined the group (a module-level function: it is pickled)."""

log = logging.getLogger(__name__)

_RENDEZVOUS_TIMEOUT = timedelta(minutes=2)
_STOP_TIMEOUT_S = 10.0
_START_POLL_S = 0.05


def launch_ranks(checkpoint: Checkpoint, config: RunnerConfig, follower: Follower) -> RankGroup:
    """Rank 0's group: with tensor_parallel_size N > 1, ranks 1..N-1 are spawned, each running
    `follower`, and joined first."""
    world_size = config.tensor_parallel_size
    device = rank_device(config.device, 0, world_size)
    if world_size == 1:
        return RankGroup(0, 1, device)
    check_shardable(checkpoint.config, world_size)
    _share_cpu_cores(device, world_size)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=_RENDEZVOUS_TIMEOUT,
                          wait_for_workers=False)
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=_run_rank, name=f"fareway-rank-{rank}", daemon=True,
                                 args=(rank, world_size, store.port, checkpoint, config, follower,
                                       log.getEffectiveLevel()))
                 for rank in range(1, world_size)]
    for process in processes:
        process.start()
    children = ChildRanks(processes)
    try:
        children.wait_until_joining(store)
        group = join_group(0, world_size, device, store)
    except BaseException:
        children.kill()
        raise
    group.adopt(children)
    children.watch(group)
    return group


class ChildRanks:
    """The ranks rank 0 spawned: watched, stopped, killed."""

    def __init__(self, processes: list[multiprocessing.Process]) -> None:
        self.processes = processes

    def watch(self, group: RankGroup) -> None:
        """Breaks `group` as soon as a rank exits while the group is not closing."""
        threading.Thread(target=self._watch, args=(group,), name="fareway-rank-watch", daemon=True).start()

    def _watch(self, group: RankGroup) -> None:
        by_sentinel = {p.sentinel: p for p in self.processes}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if group.is_closing:
            return
        process = by_sentinel[ready[0]]
        process.join()
        group.fail(f"{process.name} (pid {process.pid}) exited with code {process.exitcode}")

    def wait_until_joining(self, store: dist.Store) -> None:
        """Waits for every rank to reach the rendezvous; raises if one dies on the way instead of
        letting rank 0 wait out the rendezvous timeout."""
        keys = [_joining_key(rank) for rank in range(1, len(self.processes) + 1)]
        deadline = time.monotonic() + _RENDEZVOUS_TIMEOUT.total_seconds()
        while not store.check(keys):
            if dead := [p for p in self.processes if p.exitcode is not None]:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tensor-parallel ranks did not start in {_RENDEZVOUS_TIMEOUT}")
            time.sleep(_START_POLL_S)

    def stop(self) -> None:
        for process in self.processes:
            process.join(_STOP_TIMEOUT_S)
            if process.exitcode is None:
                log.warning("%s did not stop in %.0f s; killing it", process.name, _STOP_TIMEOUT_S)
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
        for process in self.processes:
            process.join(_STOP_TIMEOUT_S)


def _share_cpu_cores(device: torch.device, world_size: int) -> None:
    """CPU ranks share the machine: each takes its part of the cores, not all of them."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))


def _run_rank(rank: int, world_size: int, port: int, checkpoint: Checkpoint, config: RunnerConfig,
              follower: Follower, log_level: int) -> None:
    """A spawned rank's life: join, then follow rank 0 until told to stop."""
    # Rank 0 stops the ranks: a Ctrl-C reaching the whole process group is its to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    device = rank_device(config.device, rank, world_size)
    _share_cpu_cores(device, world_size)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_RENDEZVOUS_TIMEOUT)
    store.set(_joining_key(rank), "1")
    follower(checkpoint, config, join_group(rank, world_size, device, store))


@dataclass(frozen=True)
class Rendezvous:
    """A rank started by torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Rendezvous | None:
        """The rank torchrun started, or None outside torchrun (or in a world of one)."""
        if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) == 1:
            return None
        return cls(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]))

    def join(self, config: RunnerConfig) -> RankGroup:
        """Joins the other ranks torchrun started; rank 0 returns to drive them."""
        device = rank_device(config.device, self.local_rank, self.world_size)
        _share_cpu_cores(device, self.world_size)
        return join_group(self.rank, self.world_size, device)


def _joining_key(rank: int) -> str:
    return f"fareway/rank/{rank}/joining"


def _exit_with_parent() -> None:
    """Ends this process the moment its parent (rank 0) is gone, however it went."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=wait, name="fareway-parent-watch", daemon=True).start()
