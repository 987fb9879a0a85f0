"""A Fareway worker in front of a real foreign engine: `transformers serve --continuous-batching` serving
SmolLM2 (the shipped GGUF saved as a Hugging Face folder), behind a real gateway, with real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
_TO_HF = Path(__file__).parents[2] / "scripts" / "gguf_to_hf.py"


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (config with architectures, safetensors, tokenizer), from the GGUF."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    subprocess.run([sys.executable, str(_TO_HF), str(smollm2_gguf), str(out)], check=True, timeout=300,
                   capture_output=True)
    return out


class Engine:
    """`transformers serve --continuous-batching` on a free port."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.model = str(folder)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching", str(folder),
             "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--device", "cpu"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 180
        while not self.healthy():
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        self.chat(QUESTION, 4)   # the first request warms the engine up

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/{path}", data=json.dumps({"model": self.model, **body}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def chat(self, content: str, max_tokens: int) -> dict[str, Any]:
        return self.post("chat/completions", {"messages": [{"role": "user", "content": content}],
                                              "max_tokens": max_tokens, "temperature": 0})

    def cpu_seconds(self) -> float:
        """The CPU time the engine's process has used so far (user + system, from /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_rate(self, seconds: float) -> float:
        """Cores the engine keeps busy over the next `seconds`."""
        before = self.cpu_seconds()
        time.sleep(seconds)
        return (self.cpu_seconds() - before) / seconds

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture(scope="session")
def engine(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    running = Engine(hf_folder, tmp_path_factory.mktemp("engine") / "transformers-serve.log")
    yield running
    running.stop()


class Fleet:
    """Workers and a gateway in the test's background loop."""

    def __init__(self, stack: Any) -> None:  # noqa: ANN401 - tests/conftest.py's Stack
        self.stack = stack
        self.exits = contextlib.AsyncExitStack()
        self.workers: dict[str, Any] = {}
        self.http_url = ""

    def upstream(self, name: str, url: str, engine_model: str, tokenizer: Path | None,
                 kv_capacity_tokens: int = 0) -> str:
        from workers.upstream.config import UpstreamConfig
        from workers.upstream.service import UpstreamWorker, create_upstream_server

        async def start() -> str:
            worker = UpstreamWorker(UpstreamConfig(upstream=url, model=engine_model, hardware_class="cpu",
                                                   served_model_name=MODEL, tokenizer_path=tokenizer,
                                                   worker_id=name, kv_capacity_tokens=kv_capacity_tokens))
            server = await create_upstream_server(worker, "127.0.0.1:0")
            self.exits.push_async_callback(worker.stop)
            self.exits.push_async_callback(server.stop, 0)
            self.workers[name] = worker
            return f"127.0.0.1:{server.port}"
        return self.stack.loop.run(start())

    def gateway(self, workers: list[str], routing: str = "least-load") -> str:
        """A gateway in front of `workers`: its gRPC address (its HTTP edge's /v1 URL is `self.http_url`)."""
        from fareway.redis import connect
        from gateway.config import GatewayConfig
        from gateway.service import running_gateway

        async def start() -> str:
            redis = connect(self.stack.redis_url)
            self.exits.push_async_callback(redis.aclose)
            gateway = await self.exits.enter_async_context(running_gateway(GatewayConfig(
                workers=tuple(workers), listen="127.0.0.1:0", http_listen="127.0.0.1:0", routing=routing,
                worker_refresh_interval_s=0.5, shared_prefix_homes=False), redis))
            self.http_url = f"http://127.0.0.1:{gateway.http_port}/v1"
            return f"127.0.0.1:{gateway.port}"
        address = self.stack.loop.run(start())
        self.wait_models(address, len(workers))
        return address

    def usage_stripping_proxy(self, engine_url: str) -> str:
        """An engine that reports no usage (as some llama.cpp, TGI and Ollama builds do not when
        streaming): the real engine's streams, passed through with every `usage` taken out. Its /v1 URL."""
        from aiohttp import ClientSession, web

        async def start() -> str:
            session = ClientSession()
            self.exits.push_async_callback(session.close)

            async def forward(request: web.Request) -> web.StreamResponse:
                async with session.post(f"{engine_url}/{request.match_info['path']}",
                                        data=await request.read(), headers={"Content-Type": "application/json"}) as up:
                    out = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
                    await out.prepare(request)
                    async for line in up.content:
                        if line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.pop("usage", None) is not None and not chunk.get("choices"):
                                continue   # the usage-only chunk at the end
                            line = b"data: " + json.dumps(chunk).encode() + b"\n"
                        await out.write(line)
                    await out.write_eof()
                    return out

            async def listing(request: web.Request) -> web.Response:
                async with session.get(f"{engine_url}/{request.match_info['path']}") as up:
                    return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)
            app = web.Application()
            app.router.add_post("/v1/{path:.+}", forward)
            app.router.add_get("/v1/{path:.+}", listing)
            runner = web.AppRunner(app)
            await runner.setup()
            self.exits.push_async_callback(runner.cleanup)
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return f"http://127.0.0.1:{port}/v1"
        return self.stack.loop.run(start())

    def wait_models(self, address: str, count: int) -> None:
        key = self.stack.create_key("fleet-check")
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                models = stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),))
                if sum(m.num_workers for m in models.models) == count:
                    return
                time.sleep(0.2)
        raise AssertionError(f"the gateway at {address} did not see {count} workers")

    def close(self) -> None:
        self.stack.loop.run(self.exits.aclose())


@pytest.fixture()
def fleet(stack) -> Iterator[Fleet]:  # noqa: ANN001
    running = Fleet(stack)
    yield running
    running.close()


@pytest.fixture()
def team() -> str:
    return f"up-{uuid.uuid4().hex[:8]}"


def chat(content: str = QUESTION, max_tokens: int = 16, cls: type = pb.GenerateRequest) -> Any:  # noqa: ANN401
    request = cls(model=MODEL, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0))
    request.chat.messages.add(role="user", content=content)
    return request


def metadata(stack, team: str) -> tuple[tuple[str, str], ...]:  # noqa: ANN001
    return (("authorization", f"Bearer {stack.create_key(team, 'app')}"),)


def test_through_the_gateway_the_engines_greedy_answer_with_observed_metering(stack, engine, hf_folder, fleet,  # noqa: ANN001
                                                                              team) -> None:
    direct = engine.chat(QUESTION, 16)
    gateway = fleet.gateway([fleet.upstream("up-a", engine.url, engine.model, hf_folder)])
    auth = metadata(stack, team)
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        whole = stub.Generate(chat(), metadata=auth, timeout=120)
        streamed = list(stub.GenerateStream(chat(cls=pb.GenerateStreamRequest), metadata=auth, timeout=120))
    assert whole.text == direct["choices"][0]["message"]["content"] and "Paris" in whole.text
    assert "".join(m.text for m in streamed) == whole.text and len([m for m in streamed if m.text]) > 1
    assert whole.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert whole.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert (whole.usage.metering, whole.usage.token_source) == ("observed", "engine")
    assert whole.usage.gpu_seconds > 0 and whole.usage.worker_id == "up-a"
    assert wait_until(lambda: len(stack.records(team)) == 2)
    records = stack.records(team)
    assert {(r.status, r.worker_id, r.metering, r.token_source) for r in records} == {("OK", "up-a", "observed", "engine")}
    assert {r.completion_tokens for r in records} == {direct["usage"]["completion_tokens"]}


def test_device_time_splits_across_concurrent_requests_and_adds_up_to_wall_time(stack, engine, hf_folder, fleet,  # noqa: ANN001
                                                                                 team) -> None:
    gateway = fleet.gateway([fleet.upstream("up-b", engine.url, engine.model, hf_folder)])
    worker = fleet.workers["up-b"]
    attributed_before = worker.meter.attributed_gpu_seconds
    auth = metadata(stack, team)

    async def three() -> list[pb.GenerateResponse]:
        async with grpc.aio.insecure_channel(gateway) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return await asyncio.gather(*(stub.Generate(chat(f"Name {n} colours.", 24), metadata=auth, timeout=120)
                                          for n in (2, 3, 4)))
    responses = asyncio.run(three())
    assert all(r.usage.completion_tokens > 0 for r in responses)
    total, idle = stack.loop.run(_totals(worker))
    wall = (worker.meter.clock() - worker.meter.started) * worker.num_devices
    assert total == pytest.approx(wall, rel=0.01) and 0 < idle < total
    # What the records were charged is what was attributed while they ran: nothing lost, nothing twice.
    charged = sum(r.usage.gpu_seconds for r in responses)
    assert charged == pytest.approx(worker.meter.attributed_gpu_seconds - attributed_before, rel=0.01)
    # Overlapping requests share the time: each is charged less than it was in flight.
    assert all(r.usage.gpu_seconds < r.usage.total_ms / 1000 for r in responses)


async def _totals(worker: Any) -> tuple[float, float]:  # noqa: ANN401
    return worker.meter.totals()


def test_a_cancelled_stream_closes_the_engines_request_and_is_billed(stack, engine, hf_folder, fleet, team) -> None:  # noqa: ANN001
    address = fleet.upstream("up-c", engine.url, engine.model, hf_folder)
    gateway = fleet.gateway([address])
    worker = fleet.workers["up-c"]
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateStreamRequest(model=MODEL, prompt=COUNTING,
                                           sampling=pb.SamplingParams(max_tokens=2000, temperature=0))
        call = stub.GenerateStream(request, metadata=metadata(stack, team))
        received = [next(call) for _ in range(4)]
        generating = engine.cpu_rate(1.0)
        call.cancel()
        assert wait_until(lambda: worker.meter.num_in_flight == 0), "the engine's stream stayed open"
        time.sleep(0.5)
        after = engine.cpu_rate(1.0)
    assert any(m.text for m in received)
    # The engine stopped generating: while it ran it kept the CPU busy; after the cancel it idles.
    assert after < 0.25 * generating, f"the engine kept working after the cancel: {after:.2f} vs {generating:.2f} cores"
    assert wait_until(lambda: len(stack.records(team)) == 1)
    [record] = stack.records(team)
    assert (record.status, record.finish_reason, record.metering) == ("CANCELLED", "cancelled", "observed")
    assert 1 <= record.completion_tokens < 500 and record.gpu_seconds > 0


def test_a_cancelled_unary_request_is_aborted_by_call_id_and_billed(stack, engine, hf_folder, fleet, team) -> None:  # noqa: ANN001
    address = fleet.upstream("up-d", engine.url, engine.model, hf_folder)
    gateway = fleet.gateway([address])
    worker = fleet.workers["up-d"]
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        future = stub.Generate.future(pb.GenerateRequest(
            model=MODEL, prompt=COUNTING, sampling=pb.SamplingParams(max_tokens=2000, temperature=0)),
            metadata=metadata(stack, team))
        assert wait_until(lambda: worker.num_generated_tokens > 0 and worker.meter.num_in_flight == 1)
        time.sleep(0.3)
        future.cancel()
    assert wait_until(lambda: worker.meter.num_in_flight == 0)
    assert wait_until(lambda: len(stack.records(team)) == 1)
    [record] = stack.records(team)
    assert (record.status, record.finish_reason, record.worker_id) == ("CANCELLED", "cancelled", "up-d")
    assert 1 <= record.completion_tokens < 2000 and record.gpu_seconds > 0


def test_an_engine_that_is_down_is_unavailable_or_failed_over_to_a_native_worker(stack, hf_folder, fleet,  # noqa: ANN001
                                                                                 team) -> None:
    dead = fleet.upstream("up-dead", f"http://127.0.0.1:{free_port()}/v1", "smollm2", hf_folder)
    auth = metadata(stack, team)
    alone = fleet.gateway([dead])
    with grpc.insecure_channel(alone) as channel, pytest.raises(grpc.RpcError) as refused:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(chat(max_tokens=2), metadata=auth, timeout=60)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "cannot be reached" in refused.value.details()
    assert stack.records(team) == []

    mixed = fleet.gateway([dead, stack.worker_address], routing="round-robin")
    with grpc.insecure_channel(mixed) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        served = [stub.Generate(chat(max_tokens=2), metadata=auth, timeout=60) for _ in range(3)]
    assert {r.usage.worker_id for r in served} == {"test-worker"}


def test_a_mixed_fleet_is_routed_by_prefix_affinity(stack, engine, hf_folder, fleet, team) -> None:  # noqa: ANN001
    # Told the engine's KV size (as vLLM logs it), the upstream worker is weighed like the native one.
    upstream = fleet.upstream("up-e", engine.url, engine.model, hf_folder,
                              kv_capacity_tokens=stack.worker.kv_capacity_tokens)
    gateway = fleet.gateway([upstream, stack.worker_address], routing="prefix-affinity")
    auth = metadata(stack, team)
    prefixes = [f"You are assistant number {n}. " + "Answer in one short sentence, politely. " * 12
                for n in range(6)]
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        homes = {}
        for prefix in prefixes:
            workers = set()
            for question in ("Hi.", "Why?", "How?"):
                request = chat(max_tokens=1)
                request.chat.messages.insert(0, pb.ChatMessage(role="system", content=prefix))
                request.chat.messages[1].content = question
                workers.add(stub.Generate(request, metadata=auth, timeout=60).usage.worker_id)
            assert len(workers) == 1, f"one prefix went to {workers}"
            homes[prefix] = workers.pop()
    assert set(homes.values()) == {"up-e", "test-worker"}


def test_an_engine_that_reports_no_usage_is_counted_with_the_models_tokenizer(stack, engine, hf_folder, fleet,  # noqa: ANN001
                                                                             team) -> None:
    direct = engine.chat(QUESTION, 16)
    silent = fleet.usage_stripping_proxy(engine.url)
    gateway = fleet.gateway([fleet.upstream("up-t", silent, engine.model, hf_folder)])
    with grpc.insecure_channel(gateway) as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).Generate(chat(), metadata=metadata(stack, team),
                                                                         timeout=120)
    assert reply.text == direct["choices"][0]["message"]["content"]
    # The tokenizer's count is the engine's own: the chat template, the text and the end-of-sequence token.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])
    assert reply.usage.token_source == "tokenizer"
    assert wait_until(lambda: len(stack.records(team)) == 1)
    [record] = stack.records(team)
    assert (record.token_source, record.metering, record.completion_tokens) == (
        "tokenizer", "observed", direct["usage"]["completion_tokens"])


def test_the_openai_sdk_through_the_http_edge_reaches_the_engine_behind_an_upstream_worker(  # noqa: ANN001
        stack, engine, hf_folder, fleet, team) -> None:
    import openai
    direct = engine.chat(QUESTION, 16)
    fleet.gateway([fleet.upstream("up-h", engine.url, engine.model, hf_folder)])
    client = openai.OpenAI(base_url=fleet.http_url, api_key=stack.create_key(team, "app"), max_retries=0, timeout=120)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert whole.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == direct["usage"]["completion_tokens"]
    extension = whole.model_extra["fareway"]
    assert (extension["worker"], extension["metering"], extension["token_source"]) == ("up-h", "observed", "engine")
    assert wait_until(lambda: len(stack.records(team)) == 2)
    assert {(r.worker_id, r.metering) for r in stack.records(team)} == {("up-h", "observed")}


def test_engine_errors_map_to_statuses() -> None:
    from workers.upstream.client import refusal

    assert refusal(400, '{"error": {"message": "max_tokens is too large"}}', "u").code is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens is too large" in refusal(400, '{"error": {"message": "max_tokens is too large"}}', "u").message
    for status in (429, 500, 503, 401):
        assert refusal(status, "busy", "u").code is grpc.StatusCode.UNAVAILABLE
    assert len(refusal(400, "x" * 10_000, "u").message) < 400


def test_the_worker_answers_model_info_load_and_token_counts(stack, engine, hf_folder, fleet) -> None:  # noqa: ANN001
    address = fleet.upstream("up-f", engine.url, engine.model, hf_folder)
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        info = stub.GetModelInfo(wpb.GetModelInfoRequest())
        counted = stub.CountTokens(wpb.CountTokensRequest(model=MODEL, chat=chat().chat))
        load = stub.GetLoad(wpb.GetLoadRequest())
    assert (info.model, info.worker_id, info.hardware_class, info.device_count) == (MODEL, "up-f", "cpu", 1)
    assert info.context_length == 8192 and info.max_num_seqs == 64
    assert counted.prompt_tokens == engine.chat(QUESTION, 1)["usage"]["prompt_tokens"]
    assert load.num_running == 0 and load.idle_gpu_seconds > 0
