"""The worker's gRPC service: protobuf in, the engine's outputs back out.

Handlers only convert and await; tensor work runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
from opentelemetry import propagate, trace

from fareway.errors import Internal, InvalidArgument
from fareway.grpc_server import RunningServer, ServiceSpec, start_server
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.worker.v1 import worker_pb2 as pb
from fareway.worker.v1 import worker_pb2_grpc
from workers.engine.llm_engine import RequestOutput, UsageSnapshot
from workers.engine.sequence import FinishReason, Logprobs
from workers.worker import PreparedRequest, Worker

_tracer = trace.get_tracer(__name__)

FINISH_REASONS: dict[FinishReason | None, int] = {
    None: ipb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: ipb.FINISH_REASON_STOP,
    FinishReason.STOP_SEQUENCE: ipb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.LENGTH: ipb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: ipb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: ipb.FINISH_REASON_ERROR,
}


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        with self._span(request, context) as span:
            prepared = await self.worker.prepare(request)
            self._describe(span, request, prepared)
            yield pb.GenerateResponse(usage=self._usage(
                UsageSnapshot(len(prepared.prompt_token_ids), 0, 0, 0.0, 0.0, 0.0, 0.0)))
            async for output in self.worker.async_engine.generate(
                    prepared.prompt_token_ids, prepared.sampling, request.cache_salt, request.call_id):
                yield self._to_pb(output)
                if output.error:
                    raise self._failed(output)

    async def Complete(self, request: pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        with self._span(request, context) as span:
            prepared = await self.worker.prepare(request)
            self._describe(span, request, prepared)
            samples: dict[int, pb.GenerateResponse] = {}
            prompt_logprobs = []
            async with contextlib.aclosing(self.worker.async_engine.generate(
                    prepared.prompt_token_ids, prepared.sampling, request.cache_salt, request.call_id)) as outputs:
                async for output in outputs:
                    sample = samples.setdefault(output.index, pb.GenerateResponse())
                    sample.text += output.text
                    sample.token_ids.extend(output.token_ids)
                    sample.logprobs.extend(self._logprobs(output.logprobs))
                    prompt_logprobs += self._logprobs(output.prompt_logprobs)
                    if output.finish_reason is not None:
                        sample.finish_reason = FINISH_REASONS[output.finish_reason]
                        sample.stop_sequence = output.stop_sequence
            if output.error:
                raise self._failed(output)
            first = samples.get(0) or pb.GenerateResponse()
            response = pb.GenerateResponse(
                text=first.text, token_ids=first.token_ids, usage=self._usage(output.usage),
                finish_reason=first.finish_reason or FINISH_REASONS[output.finish_reason],
                stop_sequence=first.stop_sequence, logprobs=first.logprobs, prompt_logprobs=prompt_logprobs)
            if prepared.sampling.n > 1:
                response.choices.extend(
                    ipb.Choice(index=index, text=sample.text, token_ids=sample.token_ids,
                               finish_reason=sample.finish_reason or FINISH_REASONS[output.finish_reason],
                               stop_sequence=sample.stop_sequence, logprobs=sample.logprobs)
                    for index, sample in sorted(samples.items()))
            return response

    async def Abort(self, request: pb.AbortRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not request.call_id:
            raise InvalidArgument("call_id is required", field="call_id")
        return pb.AbortResponse(was_running=self.worker.async_engine.abort_call(request.call_id))

    @staticmethod
    @contextlib.contextmanager
    def _span(request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Iterator[trace.Span]:
        """The request's span, a child of the gateway's when its trace context came in the metadata.
        Never made current: Generate yields inside it, and grpc.aio closes a stream left by a client that
        cancelled during a send when it is collected, in another Context, where a context attached
        before the yield could not be detached (gateway/tracing.py)."""
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        span = _tracer.start_span("worker.generate", context=parent)
        try:
            yield span
        except Exception as exc:
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            span.end()

    def _describe(self, span: trace.Span, request: pb.GenerateRequest, prepared: PreparedRequest) -> None:
        if span.is_recording():
            span.set_attributes({"fareway.request_id": request.request_id, "fareway.model": self.worker.model_name,
                                 "fareway.worker": self.worker.worker_id,
                                 "fareway.prompt_tokens": len(prepared.prompt_token_ids)})

    def _failed(self, output: RequestOutput) -> Internal:
        """A generation that failed part way, carrying what it spent so the caller can account for it."""
        return Internal(f"generation failed on worker {self.worker.worker_id}: {output.error}",
                        details=[self._usage(output.usage)])

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:  # noqa: N802
        if not request.call_id:
            raise InvalidArgument("call_id is required", field="call_id")
        running, last = self.worker.async_engine.call_state(request.call_id)
        if running:
            return pb.GetRunResponse(state=pb.GetRunResponse.STATE_RUNNING)
        if last is None:
            return pb.GetRunResponse(state=pb.GetRunResponse.STATE_UNKNOWN)
        return pb.GetRunResponse(state=pb.GetRunResponse.STATE_FINISHED, response=pb.GenerateResponse(
            usage=self._usage(last.usage), finish_reason=FINISH_REASONS[last.finish_reason],
            stop_sequence=last.stop_sequence))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        w, runner = self.worker, self.worker.runner
        return pb.GetModelInfoResponse(
            worker_id=w.worker_id, model=w.model_name, context_length=w.context_length,
            vocab_size=runner.model_config.vocab_size, parameter_count=runner.parameter_count,
            weight_bytes=runner.weight_bytes, compute_dtype=str(runner.dtype).removeprefix("torch."),
            hardware_class=runner.hardware.hardware_class, device_type=runner.hardware.device_type,
            device_count=runner.num_devices, tensor_parallel_size=runner.group.world_size,
            kv_bytes_per_token=runner.kv_bytes_per_token,
            kv_capacity_tokens=runner.num_kv_blocks * runner.block_size, kv_block_size=runner.block_size,
            kv_cache_bytes=runner.kv_cache_bytes,
            max_sequences_at_length=runner.max_sequences_at(request.sequence_length) if request.sequence_length else 0,
            prefix_caching=w.config.enable_prefix_caching, max_num_seqs=w.config.scheduler.max_num_seqs,
            weight_dtype=runner.config.weights, kv_cache_dtype=runner.kv_cache_dtype,
            linear_kernel=runner.linear_kernel, execution=runner.execution,
            execution_reason=runner.decode_step.reason, compile_seconds=runner.decode_step.compile_seconds)

    async def GetLoad(self, request: pb.GetLoadRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        load = self.worker.engine.load()
        return pb.GetLoadResponse(
            num_running=load.num_running, num_waiting=load.num_waiting, kv_tokens_used=load.kv_tokens_used,
            kv_tokens_capacity=load.kv_tokens_capacity, prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            attributed_gpu_seconds=load.attributed_gpu_seconds, idle_gpu_seconds=load.idle_gpu_seconds,
            kv_blocks_used=load.kv_blocks_used, kv_blocks_free=load.kv_blocks_free,
            kv_blocks_cached=load.kv_blocks_cached, num_preemptions=load.num_preemptions)

    async def CountTokens(self, request: pb.CountTokensRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        self.worker.check_model(request.model)
        tokens = await self.worker.tokenize(request)
        return pb.CountTokensResponse(prompt_tokens=len(tokens), context_length=self.worker.context_length)

    def _to_pb(self, output: RequestOutput) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            text=output.text, token_ids=output.token_ids, usage=self._usage(output.usage),
            finish_reason=FINISH_REASONS[output.finish_reason], stop_sequence=output.stop_sequence,
            index=output.index, logprobs=self._logprobs(output.logprobs),
            prompt_logprobs=self._logprobs(output.prompt_logprobs))

    def _logprobs(self, positions: tuple[Logprobs, ...]) -> list[ipb.TokenLogprobs]:
        tokenizer = self.worker.tokenizer
        return [ipb.TokenLogprobs(
            token_id=p.token_id, token=tokenizer.token_text(p.token_id), logprob=p.logprob, rank=p.rank,
            token_bytes=tokenizer.token_bytes(p.token_id),
            top=[ipb.TopLogprob(token_id=token, token=tokenizer.token_text(token), logprob=value,
                                token_bytes=tokenizer.token_bytes(token)) for token, value in p.top])
            for p in positions]

    def _usage(self, usage: UsageSnapshot) -> ipb.Usage:
        hardware = self.worker.runner.hardware
        return ipb.Usage(
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, gpu_seconds=usage.gpu_seconds,
            queue_ms=usage.queue_ms, ttft_ms=usage.ttft_ms, total_ms=usage.total_ms,
            worker_id=self.worker.worker_id, hardware_class=hardware.hardware_class,
            device_count=self.worker.runner.num_devices, metering="engine-steps", token_source="engine")


async def create_worker_server(worker: Worker, address: str,
                               credentials: grpc.ServerCredentials | None = None) -> RunningServer:
    """Starts the worker's engine and its gRPC server on `address` ("host:0" for a free port),
    over TLS with `credentials`.

    Its health turns NOT_SERVING if the worker fails (a tensor-parallel rank died).
    """
    servicer = WorkerServicer(worker)
    worker.start()
    running = await start_server(address, [ServiceSpec(
        pb.DESCRIPTOR.services_by_name["WorkerService"].full_name,
        lambda server: worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server))],
        credentials=credentials)
    loop = asyncio.get_running_loop()
    worker.on_failure(lambda reason: asyncio.run_coroutine_threadsafe(running.set_serving(False), loop))
    return running
