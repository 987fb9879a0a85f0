"""The engine loop: runs in its own thread, one step at a time, and hands each
request's new text to a sink (a callback that must not block).

Callers on other threads only ever `submit` and `abort`; both go through a
queue, so the scheduler and the sequences are touched by the loop alone.
"""

from __future__ import annotations

import dataclasses
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
from workers.engine.sequence import FinishReason, Logprobs, Sampled, SamplingOptions, Sequence, sample_id
from workers.engine.stop import StopStringMatcher

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5


class Runner(Protocol):
    """What the engine needs of the ModelRunner (which owns the device)."""

    num_devices: int

    def execute(self, plan: StepPlan) -> list[Sampled | None]:
        """Runs one step (the plan's block copies first); returns what it sampled for each scheduled
        sequence that samples, else None."""

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
    """Set when sample `index` has finished."""
    stop_sequence: str = ""
    error: str = ""
    index: int = 0
    """Which of the request's samples (SamplingOptions.n) text, token_ids, logprobs and finish_reason are of."""
    logprobs: tuple[Logprobs, ...] = ()
    """One per token of token_ids, when the request asked for logprobs."""
    prompt_logprobs: tuple[Logprobs, ...] = ()
    """On the request's first output after its prompt is computed, when it asked for them."""
    done: bool = False
    """The request's last output: every sample has finished (its usage is final)."""

    @property
    def finished(self) -> bool:
        """Sample `index` has finished."""
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
class _Request:
    """A request and its samples (one sequence, or n once it forks after its prompt)."""

    request_id: str
    sink: Sink
    samples: list[Sequence]
    num_finished: int = 0
    prompt_logprobs_sent: bool = False

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.samples)


@dataclass
class _Tracked:
    """One running sample."""

    seq: Sequence
    request: _Request
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
        """Running samples, by their engine id (sample_id)."""
        self._requests: dict[str, _Request] = {}
        self._block_copies: list[tuple[int, int]] = []
        """Copies the next step makes first: forked samples' own copies of their prompt's last block."""
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
            if self._block_copies:
                plan = dataclasses.replace(plan, block_copies=tuple(self._block_copies))
                self._block_copies.clear()
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
        if request.sampling.grammar is not None:
            seq.matcher = request.sampling.grammar.matcher()
        tracked = self._track(seq, _Request(request.request_id, request.sink, [seq]))
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            seq.finish(FinishReason.ERROR)
            self._emit(tracked, "", (), seq.arrival_time, error=str(exc), done=True)
            return
        self._tracked[seq.request_id] = tracked
        self._requests[request.request_id] = tracked.request

    def _track(self, seq: Sequence, request: _Request) -> _Tracked:
        return _Tracked(seq, request, self._new_detokenizer(), StopStringMatcher(seq.sampling.stop))

    def _abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        running = [seq for seq in request.samples if seq.finish_reason is None]
        for seq in running:
            self.scheduler.abort(seq.request_id)
            seq.finish(FinishReason.CANCELLED)
            self.runner.release(seq.request_id)
            last = self._tracked.pop(seq.request_id)
        request.num_finished = len(request.samples)
        if running:
            self._emit(last, "", (), self._clock(), done=True)

    def _execute(self, plan: StepPlan) -> list[Sampled | None] | None:
        now = self._clock()
        for scheduled in plan.scheduled:
            if scheduled.seq.first_scheduled_time is None:
                scheduled.seq.first_scheduled_time = now
        try:
            return self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the worker
            log.exception("engine step failed; failing its %d requests", len(plan.scheduled))
            for scheduled in plan.scheduled:
                if (tracked := self._tracked.get(scheduled.seq.request_id)) is not None:
                    self._fail(tracked.request, f"engine step failed: {exc}")
            return None

    def _fail(self, request: _Request, error: str) -> None:
        """Ends every sample of the request; one output says why."""
        self._requests.pop(request.request_id, None)
        running = [seq for seq in request.samples if seq.finish_reason is None]
        for seq in running:
            seq.finish(FinishReason.ERROR)
            self.scheduler.finish(seq)
            self.runner.release(seq.request_id)
            last = self._tracked.pop(seq.request_id)
        request.num_finished = len(request.samples)
        if running:
            self._emit(last, "", (), self._clock(), error=error, done=True)

    def _postprocess(self, plan: StepPlan, results: list[Sampled | None], now: float) -> None:
        for scheduled, result in zip(plan.scheduled, results):
            seq = scheduled.seq
            seq.num_computed_tokens = scheduled.context_start + scheduled.num_tokens
            self.block_manager.commit(seq)  # before a finish frees them: full blocks stay cached
            if result is None:
                continue
            tracked = self._tracked[seq.request_id]
            samples = [tracked] if seq.forked else self._fork(tracked, len(result.tokens))
            for i, (sample, token) in enumerate(zip(samples, result.tokens)):
                self._on_token(sample, token, result.logprobs[i:i + 1], now)

    def _fork(self, tracked: _Tracked, n: int) -> list[_Tracked]:
        """A request of n samples has its first tokens: its sequence becomes sample 0 and n - 1 more
        share its prompt's KV (gateways and budgets see all of them in its usage)."""
        parent, request = tracked.seq, tracked.request
        parent.forked = True
        samples = [tracked]
        for index in range(1, n):
            child = Sequence(sample_id(parent.request_id, index), parent.token_ids, parent.sampling,
                             parent.arrival_time, parent.cache_salt, parent.num_shared_prefix_tokens, index=index)
            child.forked = True
            child.first_scheduled_time = parent.first_scheduled_time
            child.prompt_logprobs = parent.prompt_logprobs
            if parent.matcher is not None:
                child.matcher = parent.matcher.copy()
            if (copy := self.scheduler.fork(parent, child)) is not None:
                self._block_copies.append(copy)
            request.samples.append(child)
            samples.append(self._tracked.setdefault(child.request_id, self._track(child, request)))
        return samples

    def _on_token(self, tracked: _Tracked, token: int, logprobs: tuple[Logprobs, ...], now: float) -> None:
        seq, sampling = tracked.seq, tracked.seq.sampling
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.append_token(token)
        self.num_generated_tokens += 1
        if seq.matcher is not None and not seq.matcher.accept(token):
            self._finish(tracked, FinishReason.ERROR, "", (token,), now, logprobs,
                         error=f"the structured output's grammar refused token {token}")
            return
        may_stop = seq.num_completion_tokens >= sampling.min_tokens
        if may_stop and ((token in self.config.eos_token_ids and not sampling.ignore_eos)
                         or token in sampling.stop_token_ids):
            self._finish(tracked, FinishReason.STOP, "", (token,), now, logprobs)
            return
        text = tracked.detokenizer.push(token)
        matched = None
        if may_stop:
            text, matched = tracked.stop.feed(text)
        if matched is not None:
            self._finish(tracked, FinishReason.STOP_SEQUENCE, text, (token,), now, logprobs, stop_sequence=matched)
        elif seq.matcher is not None and seq.matcher.is_terminated():
            self._finish(tracked, FinishReason.STOP, text, (token,), now, logprobs)  # the structure is complete
        elif (seq.num_completion_tokens >= sampling.max_tokens
              or seq.num_tokens >= self.config.max_model_len):
            self._finish(tracked, FinishReason.LENGTH, text, (token,), now, logprobs)
        else:
            self._emit(tracked, text, (token,), now, logprobs)

    def _finish(self, tracked: _Tracked, reason: FinishReason, text: str, token_ids: tuple[int, ...],
                now: float, logprobs: tuple[Logprobs, ...] = (), *, stop_sequence: str = "", error: str = "") -> None:
        if reason is not FinishReason.STOP_SEQUENCE:
            tail, matched = tracked.stop.feed(tracked.detokenizer.flush())
            text += tail if matched is not None else tail + tracked.stop.flush()
            if matched is not None and reason is not FinishReason.ERROR:
                reason, stop_sequence = FinishReason.STOP_SEQUENCE, matched
        seq, request = tracked.seq, tracked.request
        seq.finish(reason, stop_sequence)
        self.scheduler.finish(seq)
        self.runner.release(seq.request_id)
        del self._tracked[seq.request_id]
        request.num_finished += 1
        if request.done:
            del self._requests[request.request_id]
        self._emit(tracked, text, token_ids, now, logprobs, error=error, done=request.done)

    def _emit(self, tracked: _Tracked, text: str, token_ids: tuple[int, ...], now: float,
              logprobs: tuple[Logprobs, ...] = (), *, error: str = "", done: bool = False) -> None:
        seq, request = tracked.seq, tracked.request
        prompt_logprobs: tuple[Logprobs, ...] = ()
        if seq.sampling.prompt_logprobs is not None and not request.prompt_logprobs_sent and (token_ids or done):
            prompt_logprobs, request.prompt_logprobs_sent = tuple(request.samples[0].prompt_logprobs), True
        request.sink(RequestOutput(request.request_id, text, token_ids, _usage(request.samples, now),
                                   seq.finish_reason, seq.stop_sequence, error, seq.index, logprobs,
                                   prompt_logprobs, done))


def _usage(samples: list[Sequence], now: float) -> UsageSnapshot:
    """A request's usage so far: its prompt once, the completion tokens and device time of every sample."""
    seq = samples[0]

    def ms_since_arrival(t: float | None) -> float:
        return 0.0 if t is None else (t - seq.arrival_time) * 1000.0

    return UsageSnapshot(
        prompt_tokens=seq.num_prompt_tokens, cached_tokens=seq.num_cached_tokens,
        completion_tokens=sum(s.num_completion_tokens for s in samples),
        gpu_seconds=sum(s.gpu_seconds for s in samples),
        queue_ms=ms_since_arrival(seq.first_scheduled_time), ttft_ms=ms_since_arrival(seq.first_token_time),
        total_ms=ms_since_arrival(now))
