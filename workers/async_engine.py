"""The bridge between grpc.aio handlers and the engine thread: each request
gets an asyncio queue that the engine fills through call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from workers.engine.llm_engine import EngineRequest, LLMEngine, RequestOutput
from workers.engine.sequence import SamplingOptions
from workers.engine.shared_prefix import SharedPrefixes


class AsyncEngine:
    def __init__(self, engine: LLMEngine, shared_prefixes: SharedPrefixes | None = None) -> None:
        self.engine = engine
        self.shared_prefixes = shared_prefixes or SharedPrefixes()

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingOptions,
                       cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; leaving the iteration early (the caller
        cancelled, its deadline passed) aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:
                pass  # the event loop has closed: nobody is listening any more

        # Engine ids are ours, not the caller's: two gateways may reuse a client's id.
        engine_id = uuid.uuid4().hex
        self.engine.submit(EngineRequest(engine_id, prompt_token_ids, sampling, sink, cache_salt,
                                         self.shared_prefixes.match(prompt_token_ids)))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.engine.abort(engine_id)
