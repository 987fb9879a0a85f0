"""A worker: one model replica, its tokenizer and its engine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fareway.errors import InvalidArgument, NotFound, shown
from fareway.validation import validate_input, validate_sampling
from fareway.worker.v1 import worker_pb2
from workers import structured
from workers.async_engine import AsyncEngine
from workers.config import WorkerConfig
from workers.engine.llm_engine import EngineConfig, LLMEngine, LoadSnapshot
from workers.engine.meter import WorkModel
from workers.engine.sequence import SamplingOptions
from workers.engine.shared_prefix import SharedPrefixes
from workers.loader import Checkpoint, default_model_path, load_checkpoint
from workers.model_runner import ModelRunner, follow
from workers.parallel.group import RankGroup
from workers.parallel.launcher import launch_ranks
from workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    sampling: SamplingOptions


class Worker:
    def __init__(self, config: WorkerConfig, checkpoint: Checkpoint | None = None,
                 group: RankGroup | None = None, device_thread: ThreadPoolExecutor | None = None) -> None:
        """Loads the model named by the config, unless an already loaded checkpoint is given.
        `group`: rank 0's place among ranks started by someone else (torchrun); by default the
        worker starts its tensor-parallel ranks itself. `device_thread`: a one-thread executor
        to share with other workers of this process that never run at the same time
        (benchmarks); by default the worker has its own."""
        started = time.monotonic()
        self.config = config
        # Every tensor operation of this worker runs on this one thread: loading, and then the engine
        # loop. A second thread doing OpenMP work would give the process a second OpenMP thread team,
        # and with more OpenMP threads than cores libgomp stops spinning between parallel regions:
        # a decode step on this 2-core machine took 30 ms instead of 20.
        self._device_thread = device_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="fareway-device")
        checkpoint, self.runner = self._device_thread.submit(self._load, checkpoint, group).result()
        self.tokenizer: Tokenizer = checkpoint.tokenizer
        self.model_name = config.served_model_name or checkpoint.name
        engine_config = EngineConfig(
            scheduler=config.scheduler, num_kv_blocks=self.runner.num_kv_blocks,
            block_size=self.runner.block_size, max_model_len=self.runner.max_model_len,
            eos_token_ids=self.tokenizer.eos_token_ids, enable_prefix_caching=config.enable_prefix_caching)
        self.engine = LLMEngine(engine_config, self.runner, WorkModel.for_config(checkpoint.config),
                                self.tokenizer.incremental_decoder)
        self.shared_prefixes = self._shared_prefixes()
        self.async_engine = AsyncEngine(self.engine, self.shared_prefixes)
        self._grammars: structured.Grammars | None = None
        """Structured outputs' compiler, built with the first constraint (it indexes the vocabulary)."""
        self._grammars_lock = threading.Lock()
        log.info("worker %s serves %s (loaded in %.1f s)", config.worker_id, self.model_name,
                 time.monotonic() - started)

    def _shared_prefixes(self) -> SharedPrefixes:
        raw = [self.tokenizer.encode(text) for text in self.config.shared_prefixes]
        system = [self.tokenizer.encode_chat([{"role": "system", "content": text}])
                  for text in self.config.shared_system_prompts]
        return SharedPrefixes(raw + system)

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    @property
    def context_length(self) -> int:
        return self.runner.max_model_len

    # The Replica protocol (workers/replica.py).

    @property
    def hardware_class(self) -> str:
        return self.runner.hardware.hardware_class

    @property
    def num_devices(self) -> int:
        return self.runner.num_devices

    @property
    def tensor_parallel_size(self) -> int:
        return self.runner.group.world_size

    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.num_kv_blocks * self.runner.block_size

    @property
    def metering(self) -> str:
        return "engine-steps"

    def load(self) -> LoadSnapshot:
        return self.engine.load()

    def device_seconds(self) -> tuple[float, float]:
        meter = self.engine.meter
        return meter.total_gpu_seconds, meter.idle_gpu_seconds

    def _load(self, checkpoint: Checkpoint | None, group: RankGroup | None) -> tuple[Checkpoint, ModelRunner]:
        if checkpoint is None:
            checkpoint = load_checkpoint(self.config.model_path or default_model_path())
        if group is None and self.config.runner.tensor_parallel_size > 1:
            group = launch_ranks(checkpoint, self.config.runner, follow)
        return checkpoint, ModelRunner(checkpoint, self.config.runner, group)

    def start(self) -> None:
        self.engine.start(self._device_thread)

    def stop(self) -> None:
        self.engine.stop()
        self.runner.close()

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(reason)` once, from another thread, if the worker can no longer serve
        (one of its tensor-parallel ranks died or stopped answering)."""
        self.runner.group.on_failure(callback)

    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise NotFound(f"model {shown(model)} is not served here; this worker serves {self.model_name!r}")

    async def tokenize(self, request: worker_pb2.GenerateRequest | worker_pb2.CountTokensRequest) -> list[int]:
        """The prompt's token ids: raw text as is, chat rendered with the model's template."""
        validate_input(request)
        if request.WhichOneof("input") == "prompt":
            return await asyncio.to_thread(self.tokenizer.encode, request.prompt)
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except ValueError as refused:  # no chat template, or the template refused the conversation
            raise InvalidArgument(str(refused), field="chat.messages") from None

    async def prepare(self, request: worker_pb2.GenerateRequest) -> PreparedRequest:
        """Validates a request against the model: bad input raises before anything runs."""
        self.check_model(request.model)
        validate_sampling(request.sampling)
        prompt = await self.tokenize(request)
        sampling = self._sampling(request.sampling, len(prompt))
        if (kind := request.sampling.WhichOneof("structured_outputs")) is not None:
            sampling = dataclasses.replace(sampling, grammar=await asyncio.to_thread(
                self._compile, kind, _constraint_spec(request.sampling, kind)))
        return PreparedRequest(prompt, sampling)

    def _compile(self, kind: str, spec: str) -> structured.CompiledGrammar:
        """The constraint compiled for this model's vocabulary (cached by content), on a thread of its own:
        a large schema takes a while."""
        if self._grammars is None:
            with self._grammars_lock:
                if self._grammars is None:
                    self._grammars = structured.Grammars(self.tokenizer, self.runner.model_config.vocab_size)
        try:
            return self._grammars.compile(structured.Constraint(kind, spec))
        except structured.GrammarError as error:
            raise InvalidArgument(f"{kind} does not compile: {error}", field=f"sampling.{kind}") from None

    def _sampling(self, params, num_prompt_tokens: int) -> SamplingOptions:  # noqa: ANN001 - pb SamplingParams
        room = self.context_length - num_prompt_tokens
        if room < 1:
            raise InvalidArgument(
                f"the prompt is {num_prompt_tokens} tokens; the model's context holds {self.context_length}",
                field="prompt")
        if params.HasField("max_tokens"):
            if params.max_tokens > room:
                raise InvalidArgument(
                    f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                    f"context length ({self.context_length}); lower max_tokens to at most {room}",
                    field="sampling.max_tokens")
            max_tokens = params.max_tokens
        else:
            max_tokens = min(self.config.default_max_tokens, room)
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=params.temperature if params.HasField("temperature") else 1.0,
            top_p=params.top_p if params.HasField("top_p") else 1.0,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
            stop=tuple(params.stop),
            min_p=params.min_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
            logit_bias=self._logit_bias(params.logit_bias),
            min_tokens=min(params.min_tokens, max_tokens),
            stop_token_ids=self._stop_token_ids(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            n=params.n if params.HasField("n") else 1,
            logprobs=params.logprobs if params.HasField("logprobs") else None,
            prompt_logprobs=params.prompt_logprobs if params.HasField("prompt_logprobs") else None)

    def _stop_token_ids(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        vocab = self.runner.model_config.vocab_size
        if (outside := next((token for token in token_ids if token >= vocab), None)) is not None:
            raise InvalidArgument(f"stop_token_ids names token {outside}; this model's vocabulary has {vocab} tokens",
                                  field="sampling.stop_token_ids")
        return tuple(dict.fromkeys(token_ids))

    def _logit_bias(self, bias: Mapping[int, float]) -> tuple[tuple[int, float], ...]:
        vocab = self.tokenizer.vocab_size
        if (outside := next((token for token in bias if token >= vocab), None)) is not None:
            raise InvalidArgument(f"logit_bias names token {outside}; this model's vocabulary has {vocab} tokens",
                                  field="sampling.logit_bias")
        return tuple(sorted(bias.items()))


def _constraint_spec(params, kind: str) -> str:  # noqa: ANN001 - pb SamplingParams
    """The constraint's text as the grammar engine takes it (choice: a JSON list of the strings)."""
    if kind == "choice":
        return json.dumps(list(params.choice.choices))
    if kind == "json_object":
        return ""
    return getattr(params, kind)
