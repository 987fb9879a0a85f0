"""The bridge between grpc.aio handlers and the engine thread: each request
gets an asyncio queue that the engine fills through call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator

from workers.engine.llm_engine import EngineRequest, LLMEngine, RequestOutput
from workers.engine.sequence import SamplingOptions
from workers.engine.shared_prefix import SharedPrefixes

# Call ids aborted before their request arrived, remembered so that it stops when it does.
_MAX_EARLY_ABORTS = 4096
# Finished calls whose last output is remembered (GetRun): a gateway's journal sweeper asks within
# seconds of the gateway's end; a few hundred bytes each.
_MAX_FINISHED_CALLS = 16384


class AsyncEngine:
    def __init__(self, engine: LLMEngine, shared_prefixes: SharedPrefixes | None = None) -> None:
        self.engine = engine
        self.shared_prefixes = shared_prefixes or SharedPrefixes()
        self._running_calls: dict[str, str] = {}
        """The engine id of each running request that came with a call id."""
        self._early_aborts: OrderedDict[str, None] = OrderedDict()
        self._finished_calls: OrderedDict[str, RequestOutput] = OrderedDict()
        """The last output of recently finished requests that came with a call id."""

    def call_state(self, call_id: str) -> tuple[bool, RequestOutput | None]:
        """Whether the request named `call_id` is running, and its last output if it finished lately
        (False, None: not seen lately). A request whose caller left is running until the engine has
        stopped it and said what it spent."""
        return call_id in self._running_calls, self._finished_calls.get(call_id)

    def abort_call(self, call_id: str) -> bool:
        """Stops the request named `call_id`; its stream then ends with a CANCELLED output. Whether it
        was running: an id not seen yet is remembered (the oldest forgotten past _MAX_EARLY_ABORTS)."""
        engine_id = self._running_calls.get(call_id)
        if engine_id is not None:
            self.engine.abort(engine_id)
            return True
        self._early_aborts[call_id] = None
        if len(self._early_aborts) > _MAX_EARLY_ABORTS:
            self._early_aborts.popitem(last=False)
        return False

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingOptions,
                       cache_salt: str = "", call_id: str = "") -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; leaving the iteration early (the caller
        cancelled, its deadline passed) aborts the request and frees its blocks.
        `call_id` names it for abort_call."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(output: RequestOutput) -> None:
            if output.done and call_id and self._running_calls.get(call_id) == engine_id:
                # Its account, kept after its caller left too (the engine's last word on an aborted run).
                del self._running_calls[call_id]
                self._finished_calls[call_id] = output
                if len(self._finished_calls) > _MAX_FINISHED_CALLS:
                    self._finished_calls.popitem(last=False)
            outputs.put_nowait(output)

        def sink(output: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(deliver, output)
            except RuntimeError:
                pass  # the event loop has closed: nobody is listening any more

        # Engine ids are ours, not the caller's: two gateways may reuse a client's id.
        engine_id = uuid.uuid4().hex
        self.engine.submit(EngineRequest(engine_id, prompt_token_ids, sampling, sink, cache_salt,
                                         self.shared_prefixes.match(prompt_token_ids)))
        if call_id:
            self._running_calls[call_id] = engine_id
            if call_id in self._early_aborts:
                del self._early_aborts[call_id]
                self.engine.abort(engine_id)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.done
                yield output
        finally:
            if not finished:
                self.engine.abort(engine_id)  # its last output, on its way, ends its call's run
