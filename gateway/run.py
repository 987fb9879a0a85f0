"""One request's run through the gateway: what it holds, what the worker said, and the response and
usage record that come of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from accounting.recorder import UsageRecord
from fareway.auth import Tenant
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import Hold, Reservation
from fareway.validation import HasInput
from fareway.worker.v1 import worker_pb2 as wpb
from gateway.fairness import Slot
from gateway.pool import WorkerEndpoint

_FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()}


class CallContext(Protocol):
    """What the request path reads of the call it serves: a gRPC ServicerContext, or the HTTP edge's
    (gateway/http_edge.py)."""

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline; None without one."""


@dataclass(frozen=True)
class Delta:
    """New text from the worker, of sample `index` (SamplingParams.n)."""

    text: str
    token_ids: tuple[int, ...]
    index: int = 0
    logprobs: tuple[pb.TokenLogprobs, ...] = ()
    """One per token of token_ids, when the request asked for logprobs."""
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    """Set when sample `index` has finished and the request has more than one sample (n > 1); a
    single sample's finish reason is on the Final response."""
    stop_sequence: str = ""
    prompt_logprobs: tuple[pb.TokenLogprobs, ...] = ()
    """On the first delta, when the request asked for prompt_logprobs."""


@dataclass(frozen=True)
class Final:
    """The whole response; `replayed` when it is a stored outcome of an earlier run."""

    response: pb.GenerateResponse
    replayed: bool = False


@dataclass
class _Sample:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    stop_sequence: str = ""


@dataclass
class Run:
    tenant: Tenant
    request: pb.GenerateRequest | pb.GenerateStreamRequest
    request_id: str
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    endpoint: WorkerEndpoint | None = None
    """The worker that took the request; None while none has (a run without one never ran)."""
    usage: pb.Usage = field(default_factory=pb.Usage)
    samples: dict[int, _Sample] = field(default_factory=dict)
    """What came of each sample (SamplingParams.n), by index."""
    prompt_logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    """Sample 0's (the record's)."""
    stop_sequence: str = ""
    ttft_ms: float = 0.0
    reservation: Reservation | None = None
    hold: Hold | None = None
    slot: Slot | None = None
    """Its place in the model's capacity, when the gateway queues fairly."""
    finishing_behind: bool = False
    """Its record and settlement are written behind its answer (gateway/finishing.py)."""
    claimed: bool = False
    """It holds the claim of its request_id (gateway/idempotency.py)."""
    call_id: str = ""
    """Names its worker call (for Abort, and GetRun: gateway/journal.py)."""

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started_monotonic) * 1000.0

    @property
    def num_samples(self) -> int:
        return self.request.sampling.n if self.request.sampling.HasField("n") else 1

    def _sample(self, index: int) -> _Sample:
        if (sample := self.samples.get(index)) is None:
            sample = self.samples[index] = _Sample()
        return sample

    def add(self, message: wpb.GenerateResponse) -> Delta | None:
        """Takes one message of the worker's stream; the new text, if it brought any (with n > 1, a
        sample's finish too)."""
        self.usage.CopyFrom(message.usage)
        if self.slot is not None:
            self.slot.charge(self.usage.prompt_tokens, self.usage.completion_tokens)
        self.prompt_logprobs.extend(message.prompt_logprobs)
        sample = self._sample(message.index)
        finished = False
        if message.finish_reason:
            sample.finish_reason, sample.stop_sequence = message.finish_reason, message.stop_sequence
            if message.index == 0:
                self.finish_reason, self.stop_sequence = message.finish_reason, message.stop_sequence
            finished = self.num_samples > 1
        if not (message.text or message.token_ids or finished or message.prompt_logprobs):
            return None
        if not self.ttft_ms and (message.text or message.token_ids):
            self.ttft_ms = self.elapsed_ms()
        sample.text.append(message.text)
        sample.token_ids.extend(message.token_ids)
        sample.logprobs.extend(message.logprobs)
        return Delta(message.text, tuple(message.token_ids), message.index, tuple(message.logprobs),
                     message.finish_reason if finished else pb.FINISH_REASON_UNSPECIFIED,
                     message.stop_sequence if finished else "", tuple(message.prompt_logprobs))

    def take_usage(self, usage: pb.Usage) -> None:
        """Takes the worker's last word on what the run spent (its text stays what came)."""
        self.usage.CopyFrom(usage)
        if self.slot is not None:
            self.slot.charge(self.usage.prompt_tokens, self.usage.completion_tokens)

    def add_whole(self, message: wpb.GenerateResponse) -> None:
        """Takes a whole response (WorkerService.Complete)."""
        self.usage.CopyFrom(message.usage)
        if self.slot is not None:
            self.slot.charge(self.usage.prompt_tokens, self.usage.completion_tokens)
        self.finish_reason, self.stop_sequence = message.finish_reason, message.stop_sequence
        self.samples = {0: _Sample([message.text], list(message.token_ids), list(message.logprobs),
                                   message.finish_reason, message.stop_sequence)}
        for choice in message.choices:
            self.samples[choice.index] = _Sample([choice.text], list(choice.token_ids), list(choice.logprobs),
                                                 choice.finish_reason, choice.stop_sequence)
        self.prompt_logprobs = list(message.prompt_logprobs)
        if message.token_ids or message.text:
            # The first token reached the gateway inside the answer: it was ready as long before the answer
            # as the worker spent after it.
            self.ttft_ms = max(0.0, self.elapsed_ms() - (self.usage.total_ms - self.usage.ttft_ms))

    def response(self) -> pb.GenerateResponse:
        usage = pb.Usage()
        usage.CopyFrom(self.usage)
        usage.ttft_ms, usage.total_ms = self.ttft_ms, self.elapsed_ms()
        first = self.samples.get(0) or _Sample()
        response = pb.GenerateResponse(
            request_id=self.request_id, model=self.request.model, text="".join(first.text),
            token_ids=first.token_ids, finish_reason=self.finish_reason, stop_sequence=self.stop_sequence,
            usage=usage, logprobs=first.logprobs, prompt_logprobs=self.prompt_logprobs)
        if self.num_samples > 1:
            response.choices.extend(
                pb.Choice(index=index, text="".join(sample.text), token_ids=sample.token_ids,
                          finish_reason=sample.finish_reason, stop_sequence=sample.stop_sequence,
                          logprobs=sample.logprobs)
                for index, sample in sorted(self.samples.items()))
        return response

    def record(self, status: grpc.StatusCode, finish_reason: int) -> UsageRecord:
        u = self.response().usage
        return UsageRecord(
            request_id=self.request_id, team=self.tenant.team, project=self.tenant.project,
            key_id=self.tenant.key_id, model=self.request.model,
            worker_id=u.worker_id or (self.endpoint.name if self.endpoint else ""),
            hardware_class=u.hardware_class, device_count=u.device_count,
            prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, completion_tokens=u.completion_tokens,
            gpu_seconds=u.gpu_seconds, queue_ms=u.queue_ms, ttft_ms=u.ttft_ms, total_ms=u.total_ms,
            status=status.name, finish_reason=_FINISH_NAMES[finish_reason],
            started_at=self.started_at, ended_at=time.time(), tags=dict(self.request.tags),
            budget_period=self.reservation.month if self.reservation else "", metering=u.metering,
            token_source=u.token_source)


def copy_input(source: HasInput, target: HasInput) -> None:
    """Copies the `input` oneof (a prompt or chat messages) between request types."""
    if source.WhichOneof("input") == "prompt":
        target.prompt = source.prompt
    else:
        target.chat.CopyFrom(source.chat)


def worker_request(run: Run) -> wpb.GenerateRequest:
    """The request as a worker takes it."""
    # The team is the prefix cache's privacy boundary: its projects share cached
    # prompts, other teams never see them (unless the worker marks a prefix shared).
    forwarded = wpb.GenerateRequest(request_id=run.request_id, model=run.request.model,
                                    sampling=run.request.sampling, cache_salt=f"team:{run.tenant.team}",
                                    call_id=run.call_id)
    copy_input(run.request, forwarded)
    return forwarded
