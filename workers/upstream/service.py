"""The WorkerService in front of an OpenAI-compatible engine.

Generate, Complete, Abort, CountTokens, GetModelInfo and GetLoad keep the native worker's contract
(protos/fareway/worker/v1/worker.proto): a Generate's first message comes once the engine has taken
the request (its HTTP answer began), so a refusal before it lets the gateway fail over; a cancelled
call or an Abort closes the engine's stream, which aborts the request there; a generation that
fails after it started reports what it spent. Tokens come from the engine's reported usage, or
from the model's tokenizer when it reports none; device time from the observed meter (meter.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from fareway.errors import FailedPrecondition, FarewayError, InvalidArgument, NotFound, shown
from fareway.grpc_server import RunningServer, ServiceSpec, start_server
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.process import stop_task
from fareway.validation import validate_input, validate_sampling
from fareway.worker.v1 import worker_pb2 as pb
from fareway.worker.v1 import worker_pb2_grpc
from workers.engine.llm_engine import LoadSnapshot
from workers.engine.meter import WorkModel
from workers.loader import load_tokenizer
from workers.models.config_files import read_model_config
from workers.tokenizer import Tokenizer
from workers.upstream.client import Chunk, UpstreamClient
from workers.upstream.config import UpstreamConfig
from workers.upstream.meter import METERING, Flight, ObservedMeter

log = logging.getLogger(__name__)

_FINISH = {"stop": ipb.FINISH_REASON_STOP, "length": ipb.FINISH_REASON_LENGTH, "abort": ipb.FINISH_REASON_CANCELLED}
_ABORTS_REMEMBERED_S = 60.0
# Finished calls whose account is remembered (GetRun), as the native worker's (workers/async_engine.py).
_MAX_FINISHED_CALLS = 16384
_METRICS_INTERVAL_S = 1.0
_PROMETHEUS_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


class Generation:
    """One request's run on the engine, as the worker has seen it so far."""

    def __init__(self, worker: UpstreamWorker, request: pb.GenerateRequest, prompt_tokens: int | None) -> None:
        self.worker = worker
        self.request = request
        self.prompt_tokens = prompt_tokens
        """Counted with the tokenizer; None without one."""
        self.started = time.monotonic()
        self.ttft_ms = 0.0
        self.text: list[str] = []
        self.num_chunks = 0
        self.finish_reason = ipb.FINISH_REASON_UNSPECIFIED
        self.stop_sequence = ""
        self.reported: dict[str, Any] | None = None
        """The engine's usage, once it reported it."""
        self.flight: Flight | None = None
        self.aborted = False

    def take(self, chunk: Chunk) -> None:
        if chunk.text:
            if not self.text:
                self.ttft_ms = (time.monotonic() - self.started) * 1000
            self.text.append(chunk.text)
            self.num_chunks += 1
        if chunk.usage is not None:
            self.reported = chunk.usage
        if chunk.finish_reason:
            self.finish_reason = _FINISH.get(chunk.finish_reason, ipb.FINISH_REASON_STOP)
            if chunk.stop_reason:
                self.finish_reason, self.stop_sequence = ipb.FINISH_REASON_STOP_SEQUENCE, chunk.stop_reason

    def usage(self, final: bool = False) -> ipb.Usage:
        """What it spent so far; `final`: counted as the record will have it (the tokenizer counts the whole
        text if the engine reported nothing)."""
        prompt, cached, completion, source = self.prompt_tokens or 0, 0, self.num_chunks, "engine"
        if self.reported is not None:
            prompt = int(self.reported.get("prompt_tokens") or prompt)
            completion = int(self.reported.get("completion_tokens") or completion)
            details = self.reported.get("prompt_tokens_details")
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        elif self.worker.tokenizer is not None:
            source = "tokenizer"
            if final:
                completion = len(self.worker.tokenizer.encode("".join(self.text)))
                if self.finish_reason == ipb.FINISH_REASON_STOP:
                    completion += 1   # the end-of-sequence token: generated (engines count it), never shown
        else:
            source = "none"
        w = self.worker
        return ipb.Usage(
            prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
            gpu_seconds=self.flight.gpu_seconds if self.flight else 0.0, ttft_ms=self.ttft_ms,
            total_ms=(time.monotonic() - self.started) * 1000, worker_id=w.worker_id,
            hardware_class=w.hardware_class, device_count=w.num_devices, metering=METERING, token_source=source)


class UpstreamWorker:
    """The engine behind this worker, as a Replica (workers/replica.py) and a source of generations."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.client = UpstreamClient(config.upstream, config.api_key)
        self.tokenizer: Tokenizer | None = None
        work_model = None
        self._model_context = 0
        if config.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(config.tokenizer_path)
            shape = read_model_config(config.tokenizer_path)
            work_model, self._model_context = WorkModel.for_config(shape), shape.max_position_embeddings
        self.meter = ObservedMeter(config.device_count, work_model)
        self.context_length = config.context_length or 0
        self.num_generated_tokens = 0
        self._calls: dict[str, asyncio.Task[Any]] = {}
        self._aborted: dict[str, float] = {}
        self._running: set[str] = set()
        self._finished: OrderedDict[str, pb.GenerateResponse] = OrderedDict()
        self._engine_load: dict[str, float] = {}
        self._metrics_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Learns the engine's context length (vLLM's /v1/models says max_model_len) unless configured, and
        starts reading its metrics if asked to."""
        if not self.context_length:
            try:
                listed = await self.client.get_json("models")
                entry = next((m for m in listed.get("data", []) if m.get("id") == self.config.model), {})
                self.context_length = int(entry.get("max_model_len") or 0)
            except (FarewayError, OSError, ValueError, TimeoutError) as exc:
                log.warning("could not list the upstream engine's models: %s", exc)
            self.context_length = self.context_length or self._model_context
        if self.config.metrics_url:
            self._metrics_task = asyncio.get_running_loop().create_task(self._read_metrics_forever())

    async def stop(self) -> None:
        if self._metrics_task is not None:
            await stop_task(self._metrics_task)
        await self.client.close()

    # The Replica protocol.

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    @property
    def model_name(self) -> str:
        return self.config.name

    @property
    def hardware_class(self) -> str:
        return self.config.hardware_class

    @property
    def num_devices(self) -> int:
        return self.config.device_count

    @property
    def tensor_parallel_size(self) -> int:
        return self.config.tensor_parallel_size

    @property
    def kv_capacity_tokens(self) -> int:
        return self.config.kv_capacity_tokens

    @property
    def metering(self) -> str:
        return METERING

    def load(self) -> LoadSnapshot:
        total, idle = self.meter.totals()
        capacity = self.kv_capacity_tokens
        used = round(capacity * self._engine_load.get("kv_usage", 0.0))
        return LoadSnapshot(
            num_running=self.meter.num_in_flight, num_waiting=int(self._engine_load.get("waiting", 0)),
            kv_block_size=1, kv_blocks_total=capacity, kv_blocks_used=used, kv_blocks_cached=0,
            prefix_cache_hit_rate=0.0, num_preemptions=0, attributed_gpu_seconds=total - idle,
            idle_gpu_seconds=idle, num_generated_tokens=self.num_generated_tokens)

    def device_seconds(self) -> tuple[float, float]:
        return self.meter.totals()

    # Requests.

    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise NotFound(f"model {shown(model)} is not served here; this worker serves {self.model_name!r}")

    async def count(self, request: pb.GenerateRequest | pb.CountTokensRequest) -> int | None:
        """The prompt's tokens by the model's tokenizer (its chat template for chat); None without one."""
        validate_input(request)
        if self.tokenizer is None:
            return None
        if request.WhichOneof("input") == "prompt":
            return len(await asyncio.to_thread(self.tokenizer.encode, request.prompt))
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        try:
            return len(await asyncio.to_thread(self.tokenizer.encode_chat, messages))
        except ValueError as refused:  # no chat template, or the template refused the conversation
            raise InvalidArgument(str(refused), field="chat.messages") from None

    def _body(self, request: pb.GenerateRequest, prompt_tokens: int | None) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        room = self.context_length - prompt_tokens if self.context_length and prompt_tokens is not None else None
        if room is not None and room < 1:
            raise InvalidArgument(f"the prompt is {prompt_tokens} tokens; the model's context holds "
                                  f"{self.context_length}", field="prompt")
        if s.HasField("max_tokens"):
            if room is not None and s.max_tokens > room:
                raise InvalidArgument(
                    f"prompt ({prompt_tokens} tokens) + max_tokens ({s.max_tokens}) exceeds the context length "
                    f"({self.context_length}); lower max_tokens to at most {room}", field="sampling.max_tokens")
            max_tokens = s.max_tokens
        else:
            max_tokens = min(self.config.default_max_tokens, room) if room is not None else self.config.default_max_tokens
        body: dict[str, Any] = {"model": self.config.model, "max_tokens": max_tokens,
                                "temperature": s.temperature if s.HasField("temperature") else 1.0}
        if s.HasField("top_p"):
            body["top_p"] = s.top_p
        if s.top_k:
            body["top_k"] = s.top_k
        if s.HasField("seed"):
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        # OpenAI's penalties and logit_bias (string token ids), and vLLM's, SGLang's min_p and repetition_penalty.
        for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if s.HasField(name):
                body[name] = getattr(s, name)
        if s.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in sorted(s.logit_bias.items())}
        body.update(_relayed_extras(s))
        if self.config.forward_cache_salt and request.cache_salt:
            body["cache_salt"] = request.cache_salt
        if request.WhichOneof("input") == "prompt":
            return "completions", {**body, "prompt": request.prompt}
        return "chat/completions", {**body, "messages": [{"role": m.role, "content": m.content}
                                                          for m in request.chat.messages]}

    async def generation(self, request: pb.GenerateRequest) -> Generation:
        """A request checked against the model and counted; bad input raises before anything runs."""
        self.check_model(request.model)
        validate_sampling(request.sampling)
        return Generation(self, request, await self.count(request))

    async def run(self, generation: Generation, timeout_s: float | None) -> AsyncIterator[pb.GenerateResponse]:
        """The generation's messages: a first one once the engine has taken it (the prompt's usage, no text),
        one per piece of text, and a last one with the finish reason and the final usage. A failure after the
        first message carries what was spent (FarewayError details)."""
        path, body = self._body(generation.request, generation.prompt_tokens)
        async with self.client.stream(path, body, timeout_s) as chunks:
            estimate = generation.prompt_tokens or max(1, len(str(body.get("prompt") or body.get("messages"))) // 4)
            generation.flight = self.meter.start(estimate)
            try:
                yield pb.GenerateResponse(usage=generation.usage())
                async for chunk in chunks:
                    generation.take(chunk)
                    if chunk.text:
                        self.meter.progress(generation.flight, generation.num_chunks)
                        self.num_generated_tokens += 1
                        yield pb.GenerateResponse(text=chunk.text, usage=generation.usage())
            except FarewayError as error:
                self.meter.end(generation.flight)
                error.details = [*error.details, generation.usage(final=True)]
                raise
            finally:
                self.meter.end(generation.flight)
        if generation.finish_reason == ipb.FINISH_REASON_UNSPECIFIED:
            generation.finish_reason = ipb.FINISH_REASON_STOP   # the stream ended without saying why
        yield pb.GenerateResponse(usage=generation.usage(final=True), finish_reason=generation.finish_reason,
                                  stop_sequence=generation.stop_sequence)

    @contextlib.contextmanager
    def accounted(self, call_id: str, generation: Generation) -> Iterator[None]:
        """While the block runs the call is running; after it, however it ended, its account (usage,
        finish reason) is kept for GetRun."""
        if not call_id:
            yield
            return
        self._running.add(call_id)
        try:
            yield
        finally:
            self._running.discard(call_id)
            reason = generation.finish_reason or ipb.FINISH_REASON_CANCELLED
            self._finished[call_id] = pb.GenerateResponse(usage=generation.usage(final=True), finish_reason=reason,
                                                          stop_sequence=generation.stop_sequence)
            if len(self._finished) > _MAX_FINISHED_CALLS:
                self._finished.popitem(last=False)

    def run_state(self, call_id: str) -> pb.GetRunResponse:
        if call_id in self._running:
            return pb.GetRunResponse(state=pb.GetRunResponse.STATE_RUNNING)
        if (finished := self._finished.get(call_id)) is not None:
            return pb.GetRunResponse(state=pb.GetRunResponse.STATE_FINISHED, response=finished)
        return pb.GetRunResponse(state=pb.GetRunResponse.STATE_UNKNOWN)

    def take_early_abort(self, call_id: str) -> bool:
        """Whether an Abort for this call id arrived before the call itself (forgotten once taken)."""
        return bool(call_id) and self._aborted.pop(call_id, None) is not None

    @contextlib.contextmanager
    def abortable(self, call_id: str, task: asyncio.Task[Any]) -> Iterator[None]:
        """While the block runs, an Abort for `call_id` cancels `task`."""
        if call_id:
            self._calls[call_id] = task
        try:
            yield
        finally:
            if call_id:
                self._calls.pop(call_id, None)

    def abort(self, call_id: str) -> bool:
        """Stops the Complete call with this id; an id not running yet is remembered for a while."""
        now = time.monotonic()
        self._aborted = {c: t for c, t in self._aborted.items() if now - t < _ABORTS_REMEMBERED_S}
        task = self._calls.get(call_id)
        if task is None:
            self._aborted[call_id] = now
            return False
        task.cancel()
        return True

    async def _read_metrics_forever(self) -> None:
        while True:
            try:
                self._engine_load = parse_engine_metrics(await self.client.get_text(self.config.metrics_url))
            except Exception as exc:  # noqa: BLE001 - the last figures stand until a read succeeds
                log.debug("could not read the upstream engine's metrics: %s", exc)
            await asyncio.sleep(_METRICS_INTERVAL_S)


def parse_engine_metrics(text: str) -> dict[str, float]:
    """Queue depth and KV-cache usage (0-1) from vLLM's Prometheus metrics (SGLang's names too)."""
    found: dict[str, float] = {}
    names = {"vllm:num_requests_waiting": "waiting", "sglang:num_queue_reqs": "waiting",
             "vllm:gpu_cache_usage_perc": "kv_usage", "vllm:kv_cache_usage_perc": "kv_usage",
             "sglang:token_usage": "kv_usage"}
    for line in text.splitlines():
        match = _PROMETHEUS_LINE.match(line)
        if match and match.group(1) in names:
            key = names[match.group(1)]
            found[key] = found.get(key, 0.0) + float(match.group(3))   # summed over label sets
    return found


class UpstreamServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker: UpstreamWorker) -> None:
        self.worker = worker

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        generation = await self.worker.generation(request)
        with self.worker.accounted(request.call_id, generation):
            async with contextlib.aclosing(self.worker.run(generation, context.time_remaining())) as messages:
                async for message in messages:
                    yield message

    async def Complete(self, request: pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        generation = await self.worker.generation(request)
        if self.worker.take_early_abort(request.call_id):
            generation.finish_reason = ipb.FINISH_REASON_CANCELLED
            return pb.GenerateResponse(usage=generation.usage(final=True), finish_reason=generation.finish_reason)
        task = asyncio.ensure_future(self._drain(generation, context.time_remaining()))
        with self.worker.accounted(request.call_id, generation), self.worker.abortable(request.call_id, task):
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise   # this call itself was cancelled (the gateway went away), not aborted
                generation.finish_reason = ipb.FINISH_REASON_CANCELLED   # aborted: what it spent is answered
        return pb.GenerateResponse(text="".join(generation.text), usage=generation.usage(final=True),
                                   finish_reason=generation.finish_reason, stop_sequence=generation.stop_sequence)

    async def _drain(self, generation: Generation, timeout_s: float | None) -> None:
        async with contextlib.aclosing(self.worker.run(generation, timeout_s)) as messages:
            async for _ in messages:
                pass

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:  # noqa: N802
        if not request.call_id:
            raise InvalidArgument("call_id is required", field="call_id")
        return pb.AbortResponse(was_running=self.worker.abort(request.call_id))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:  # noqa: N802
        if not request.call_id:
            raise InvalidArgument("call_id is required", field="call_id")
        return self.worker.run_state(request.call_id)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        w = self.worker
        return pb.GetModelInfoResponse(
            worker_id=w.worker_id, model=w.model_name, context_length=w.context_length,
            vocab_size=w.tokenizer.backend.get_vocab_size() if w.tokenizer else 0,
            hardware_class=w.hardware_class, device_type="cpu" if w.hardware_class == "cpu" else "cuda",
            device_count=w.num_devices, tensor_parallel_size=w.tensor_parallel_size,
            max_num_seqs=w.config.max_num_seqs, linear_kernel="upstream", kv_capacity_tokens=w.kv_capacity_tokens)

    async def GetLoad(self, request: pb.GetLoadRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        load = self.worker.load()
        return pb.GetLoadResponse(num_running=load.num_running, num_waiting=load.num_waiting,
                                  kv_tokens_used=load.kv_tokens_used, kv_tokens_capacity=load.kv_blocks_total,
                                  attributed_gpu_seconds=load.attributed_gpu_seconds,
                                  idle_gpu_seconds=load.idle_gpu_seconds)

    async def CountTokens(self, request: pb.CountTokensRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        self.worker.check_model(request.model)
        counted = await self.worker.count(request)
        if counted is None:
            raise FailedPrecondition("this worker fronts another engine and was started without --tokenizer, "
                                     "so it cannot count tokens")
        return pb.CountTokensResponse(prompt_tokens=counted, context_length=self.worker.context_length)


async def create_upstream_server(worker: UpstreamWorker, address: str,
                                 credentials: grpc.ServerCredentials | None = None) -> RunningServer:
    """Starts the worker (its engine's context length learned) and its gRPC server on `address`."""
    await worker.start()
    servicer = UpstreamServicer(worker)
    return await start_server(address, [ServiceSpec(
        pb.DESCRIPTOR.services_by_name["WorkerService"].full_name,
        lambda server: worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server))],
        credentials=credentials)


async def serve_upstream(config: UpstreamConfig, redis_url: str | None) -> int:
    """Serves until SIGINT/SIGTERM; with `redis_url` registered in the worker registry and reporting its
    device time, like a native worker (workers/serving.py). At shutdown it leaves the registry first,
    then lets in-flight requests finish for up to the drain timeout."""
    from fareway.process import wait_for_shutdown_signal
    from workers.heartbeat import advertised_address
    from workers.serving import in_the_fleet

    worker = UpstreamWorker(config)
    server = await create_upstream_server(worker, config.listen, config.tls.credentials() if config.tls else None)
    log.info("worker %s listening on port %d, in front of %s (model %s)", config.worker_id, server.port,
             config.upstream, config.model)
    try:
        async with in_the_fleet(worker, server, redis_url,
                                advertised_address(config.listen, server.port, config.advertise_address),
                                config.drain_timeout_s):
            await wait_for_shutdown_signal()
    finally:
        await worker.stop()
    return 0


def _relayed_extras(s: ipb.SamplingParams) -> dict[str, Any]:
    """vLLM's (and SGLang's) min_tokens, stop_token_ids and ignore_eos, and the structured-output
    constraint: JSON as OpenAI's response_format, the others as vLLM's structured_outputs. What this
    worker cannot relay yet (it reads one text stream) is refused before the engine runs anything."""
    for name in ("n", "logprobs", "prompt_logprobs"):
        if s.HasField(name) and (name != "n" or s.n > 1):
            raise InvalidArgument(f"{name} is not relayed to upstream engines yet; this worker fronts one, "
                                  "so send it to a worker running Fareway's engine", field=f"sampling.{name}")
    body: dict[str, Any] = {}
    if s.HasField("min_tokens"):
        body["min_tokens"] = s.min_tokens
    if s.stop_token_ids:
        body["stop_token_ids"] = list(s.stop_token_ids)
    if s.ignore_eos:
        body["ignore_eos"] = True
    kind = s.WhichOneof("structured_outputs")
    if kind == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": json.loads(s.json_schema)}}
    elif kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif kind == "choice":
        body["structured_outputs"] = {"choice": list(s.choice.choices)}
    elif kind is not None:
        body["structured_outputs"] = {kind: getattr(s, kind)}
    return body
