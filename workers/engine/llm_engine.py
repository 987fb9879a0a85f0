"""The engine loop: runs in its own thread, one step at a time, and hands each
request's new text to a sink (a callback that must not block).

Callers on other threads only ever `submit` and `abort`; both go through a
queue, so the scheduler and the sequences are touched by the loop alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Protocol

from workers.engine.block_manager import BlockManager
from workers.engine.meter import Meter, WorkModel
from workers.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from workers.engine.sequence import FinishReason, SamplingOptions, Sequence
from workers.engine.stop import StopStringMatcher

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5


class Runner(Protocol):
    """What the engine needs of the ModelRunner (which owns the device)."""

    num_devices: int

    def execute(self, plan: StepPlan) -> list[int | None]:
        """Runs one step; returns the sampled token for each scheduled sequence that samples, else None."""

    def release(self, request_id: str) -> None:
        """Forgets per-request state (e.g. its random generator)."""


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    """Longest sequence, prompt and completion together."""
    eos_token_ids: frozenset[int]
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class UsageSnapshot:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    gpu_seconds: float
    queue_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    text: str
    """New text since the previous output."""
    token_ids: tuple[int, ...]
    """New tokens since the previous output (an end-of-sequence token included)."""
    usage: UsageSnapshot
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    sink: Sink
    cache_salt: str = ""
    num_shared_prefix_tokens: int = 0
    """Leading prompt tokens inside an operator-marked shared prefix (reused across salts)."""


@dataclass(frozen=True)
class LoadSnapshot:
    num_running: int
    num_waiting: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    """Blocks held by running sequences."""
    kv_blocks_cached: int
    """Blocks holding a reusable prefix (held or free)."""
    prefix_cache_hit_rate: float
    """Share of admitted prompt tokens served from the prefix cache."""
    num_preemptions: int
    attributed_gpu_seconds: float
    idle_gpu_seconds: float
    num_generated_tokens: int = 0
    """Completion tokens produced since the engine started (its throughput is measured from it)."""

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    @property
    def kv_tokens_used(self) -> int:
        return self.kv_blocks_used * self.kv_block_size

    @property
    def kv_tokens_capacity(self) -> int:
        return self.kv_blocks_total * self.kv_block_size


@dataclass
class _Tracked:
    seq: Sequence
    sink: Sink
    detokenizer: Detokenizer
    stop: StopStringMatcher


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: Runner, work_model: WorkModel,
                 detokenizer_factory: Callable[[], Detokenizer],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.runner = runner
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.meter = Meter(work_model, runner.num_devices)
        self.num_generated_tokens = 0
        self._new_detokenizer = detokenizer_factory
        self._clock = clock
        self._inbox: queue.SimpleQueue[EngineRequest | str | None] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._thread: threading.Thread | None = None
        self._running: Future[None] | None = None
        self._stopping = threading.Event()

    # -- called from any thread --------------------------------------------

    def start(self, executor: Executor | None = None) -> None:
        """Runs the loop on `executor` (the thread that owns the device, see `Worker`), or on a
        thread of its own."""
        self._stopping.clear()
        if executor is not None:
            self._running = executor.submit(self._loop)
            return
        self._thread = threading.Thread(target=self._loop, name="fareway-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._running is not None:
            self._running.result()
            self._running = None

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(request)

    def abort(self, request_id: str) -> None:
        """Stops the request and frees its KV blocks at the next step boundary."""
        self._inbox.put(request_id)

    def load(self) -> LoadSnapshot:
        """A snapshot read without locks: each figure is current, together they may be a step apart."""
        bm, stats = self.block_manager, self.scheduler.stats
        return LoadSnapshot(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_block_size=bm.block_size, kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached=bm.num_cached_blocks, prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
            num_preemptions=stats.num_preemptions, attributed_gpu_seconds=self.meter.attributed_gpu_seconds,
            idle_gpu_seconds=self.meter.idle_gpu_seconds, num_generated_tokens=self.num_generated_tokens)

    # -- the loop thread ------------------------------------------------------

    def _loop(self) -> None:
        last = self._clock()
        while not self._stopping.is_set():
            was_idle = not self.scheduler.has_work
            self._drain_inbox(block=was_idle)
            if was_idle:
                # The device sat idle until the wait ended, whether or not work arrived.
                now = self._clock()
                self.meter.record_idle(now - last)
                last = now
            if not self.scheduler.has_work:
                continue
            plan = self.scheduler.schedule()
            work = self.meter.step_work(plan)
            tokens = self._execute(plan)
            now = self._clock()
            self.meter.record_step(work, now - last)
            last = now
            if tokens is not None:
                self._postprocess(plan, tokens, now)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_POLL_S) if block else self._inbox.get_nowait()
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, item: EngineRequest | str | None) -> None:
        if item is None:
            return
        if isinstance(item, str):
            self._abort(item)
            return
        self._admit(item)

    def _admit(self, request: EngineRequest) -> None:
        seq = Sequence(request.request_id, request.prompt_token_ids, request.sampling,
                       self._clock(), request.cache_salt, request.num_shared_prefix_tokens)
        tracked = _Tracked(seq, request.sink, self._new_detokenizer(), StopStringMatcher(request.sampling.stop))
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            seq.finish(FinishReason.ERROR)
            self._emit(tracked, "", (), seq.arrival_time, error=str(exc))
            return
        self._tracked[seq.request_id] = tracked

    def _abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        tracked = self._tracked.pop(request_id, None)
        if seq is None or tracked is None:
            return
        seq.finish(FinishReason.CANCELLED)
        self.runner.release(request_id)
        self._emit(tracked, "", (), self._clock())

    def _execute(self, plan: StepPlan) -> list[int | None] | None:
        now = self._clock()
        for scheduled in plan.scheduled:
            if scheduled.seq.first_scheduled_time is None:
                scheduled.seq.first_scheduled_time = now
        try:
            return self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the worker
            log.exception("engine step failed; failing its %d requests", len(plan.scheduled))
            for scheduled in plan.scheduled:
                self._finish(self._tracked[scheduled.seq.request_id], FinishReason.ERROR, "", (),
                             self._clock(), error=f"engine step failed: {exc}")
            return None

    def _postprocess(self, plan: StepPlan, tokens: list[int | None], now: float) -> None:
        for scheduled, token in zip(plan.scheduled, tokens):
            seq = scheduled.seq
            seq.num_computed_tokens = scheduled.context_start + scheduled.num_tokens
            self.block_manager.commit(seq)  # before a finish frees them: full blocks stay cached
            if token is not None:
                self._on_token(self._tracked[seq.request_id], token, now)

    def _on_token(self, tracked: _Tracked, token: int, now: float) -> None:
        seq = tracked.seq
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.append_token(token)
        self.num_generated_tokens += 1
        if token in self.config.eos_token_ids and not seq.sampling.ignore_eos:
            self._finish(tracked, FinishReason.STOP, "", (token,), now)
            return
        text, matched = tracked.stop.feed(tracked.detokenizer.push(token))
        if matched is not None:
            self._finish(tracked, FinishReason.STOP_SEQUENCE, text, (token,), now, stop_sequence=matched)
        elif (seq.num_completion_tokens >= seq.sampling.max_tokens
              or seq.num_tokens >= self.config.max_model_len):
            self._finish(tracked, FinishReason.LENGTH, text, (token,), now)
        else:
            self._emit(tracked, text, (token,), now)

    def _finish(self, tracked: _Tracked, reason: FinishReason, text: str, token_ids: tuple[int, ...],
                now: float, *, stop_sequence: str = "", error: str = "") -> None:
        if reason is not FinishReason.STOP_SEQUENCE:
            tail, matched = tracked.stop.feed(tracked.detokenizer.flush())
            text += tail if matched is not None else tail + tracked.stop.flush()
            if matched is not None and reason is not FinishReason.ERROR:
                reason, stop_sequence = FinishReason.STOP_SEQUENCE, matched
        tracked.seq.finish(reason, stop_sequence)
        self.scheduler.finish(tracked.seq)
        self.runner.release(tracked.seq.request_id)
        del self._tracked[tracked.seq.request_id]
        self._emit(tracked, text, token_ids, now, error=error)

    def _emit(self, tracked: _Tracked, text: str, token_ids: tuple[int, ...], now: float,
              *, error: str = "") -> None:
        seq = tracked.seq
        tracked.sink(RequestOutput(seq.request_id, text, token_ids, _usage(seq, now),
                                   seq.finish_reason, seq.stop_sequence, error))


def _usage(seq: Sequence, now: float) -> UsageSnapshot:
    def ms_since_arrival(t: float | None) -> float:
        return 0.0 if t is None else (t - seq.arrival_time) * 1000.0

    return UsageSnapshot(
        prompt_tokens=seq.num_prompt_tokens, cached_tokens=seq.num_cached_tokens,
        completion_tokens=seq.num_completion_tokens, gpu_seconds=seq.gpu_seconds,
        queue_ms=ms_since_arrival(seq.first_scheduled_time), ttft_ms=ms_since_arrival(seq.first_token_time),
        total_ms=ms_since_arrival(now))
