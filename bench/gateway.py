"""The gateway's cost and its routing, with every piece a separate process (real
redis-server, `fareway gateway`, workers of a random-weight model on SmolLM2's
tokenizer), the client in this one:

1. Overhead: latency of a 1-token request through the gateway (auth, rate limits,
   a budget, usage accounting and idempotency-free dispatch, all on) minus the same
   request sent to the worker directly; alternating, p50 and p99 of each. Alongside,
   the same request with a request_id (its claim, and its outcome stored before the
   answer), and the same request through the same gateway's OpenAI-compatible HTTP edge
   (`POST /v1/completions` from an aiohttp client; target: its overhead within 1.5x the
   gRPC edge's).
2. Requests per second one gateway process sustains with 32 concurrent grpc.aio
   clients, vs the same clients on the worker directly (alternating rounds); and the
   gateway process's CPU time per request in those rounds (from /proc), which bounds
   what one core given to the gateway alone would sustain.
   Both phases also measure, in the same alternation, a gateway whose Redis calls go through
   redis-py's public pipelines instead of the batcher's own connection (what the gateway does on
   a redis-py release fareway/redis/redis_py.py was not written for), and with `--baseline DIR`
   the gateway of another checkout (e.g. `git worktree add /tmp/base <commit>`): before and after
   a change, in one run.
3. Prefix-affinity vs round-robin routing over 2 workers, and over 4 (prefix caching on):
   4 shared system prompts x 3 teams with varied user questions; fleet prefix-cache
   hit rate (cached / prompt tokens over the responses) and requests per second.
   Each run uses fresh teams, so it starts with cold caches; the runs alternate.
   Each worker's KV cache holds about 70% of the prefixes' tokens: the fleet
   holds them all, one worker does not (the regime where routing matters).
   The limit to compare with: the same workload on one worker whose cache holds
   every prefix twice over, so that only first sightings and the varied questions
   miss ("ideal"): no routing of 2 workers can beat it. Also measured: two gateway
   replicas in front of the 2 workers, with prefix homes shared through Redis or
   each replica's own.

On 2 cores the client, the gateway, the worker(s) and Redis share the CPU: the
absolute figures are the machine's; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

from bench.latency import alternating, percentile
from fareway.auth import KeyStore, Role
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from fareway.redis import connect
from fareway.redis.embedded import EmbeddedRedis
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc

SIZES = {
    # tests/conftest.py's TINY_CONFIG: the worker's own time is small, so the gateway's shows.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    # Big enough that a prefill of a few hundred tokens costs more than the request around it.
    "small": dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
}
BASE_CONFIG = dict(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
CONCURRENCY = 32
TEAMS, SYSTEM_PROMPTS, AFFINITY_CONCURRENCY, AFFINITY_MAX_TOKENS = 3, 4, 4, 4
KV_FRACTION = 0.7
"""Each affinity worker's KV capacity, as a share of the tokens of all the run's distinct prefixes."""
PROMPT = "Say one word."


def kv_bytes_per_token(size: str) -> int:
    s = SIZES[size]
    return 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"] * 4


def tokenizer():  # noqa: ANN201 - workers.tokenizer.Tokenizer
    """SmolLM2's tokenizer, read from the GGUF's header alone (no weights)."""
    from workers.loader import default_model_path
    from workers.loader.gguf_loader import gguf_tokenizer
    from workers.models.gguf_header import read_gguf_header
    return gguf_tokenizer(read_gguf_header(default_model_path()).metadata)


# --- the worker process -------------------------------------------------------------------------

async def serve_worker(port: int, size: str, kv_bytes: int, worker_id: str) -> None:
    from fareway.process import wait_for_shutdown_signal
    from workers.config import RunnerConfig, WorkerConfig
    from workers.loader.checkpoint import Checkpoint
    from workers.models.config import LlamaConfig
    from workers.server import create_worker_server
    from workers.worker import Worker

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import random_llama_tensors

    config = LlamaConfig(**BASE_CONFIG, **SIZES[size])
    checkpoint = Checkpoint(config, random_llama_tensors(config), tokenizer(), f"bench-{size}", Path(size))
    worker = Worker(WorkerConfig(worker_id=worker_id, runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=kv_bytes)),
                    checkpoint)
    server = await create_worker_server(worker, f"127.0.0.1:{port}")
    try:
        await wait_for_shutdown_signal()
    finally:
        await server.stop(0)
        worker.stop()


# --- processes ----------------------------------------------------------------------------------

class Processes:
    def __init__(self, data: Path, redis_url: str) -> None:
        self.data, self.redis_url = data, redis_url
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}
        self.http_urls: dict[str, str] = {}

    def _spawn(self, args: list[str], name: str, threads: int, tree: Path | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "REDIS_URL": self.redis_url, "FAREWAY_DATA_DIR": str(self.data),
               "FAREWAY_TRACES": "none", "OMP_NUM_THREADS": str(threads)}
        if tree is not None:  # its packages ahead of this checkout's
            env["PYTHONPATH"] = str(tree)
        log = open(self.data / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        child = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=tree)
        self.children[name] = child
        self.pids[name] = child.pid
        return child

    def worker(self, size: str, kv_bytes: int, name: str) -> str:
        port = free_port()
        self._spawn(["-m", "bench.gateway", "--serve-worker", str(port), "--size", size,
                     "--kv-bytes", str(kv_bytes), "--worker-id", name], name, threads=1)
        return f"127.0.0.1:{port}"

    def gateway(self, workers: list[str], routing: str, name: str, *options: str, tree: Path | None = None,
                pipelines: bool = False, http: bool = False) -> str:
        """A `fareway gateway` process; from the checkout `tree` if given; with `pipelines`, sending its
        Redis calls through redis-py pipelines (it is told its redis-py is one the adapter does not know);
        with `http`, serving its HTTP edge too (its URL in `http_urls`)."""
        port = free_port()
        args = ["gateway", "--listen", f"127.0.0.1:{port}", "--routing", routing,
                "--spool-dir", str(self.data / f"spool-{name}"), *options]
        if http:
            http_port = free_port()
            args += ["--http-listen", f"127.0.0.1:{http_port}"]
            self.http_urls[name] = f"http://127.0.0.1:{http_port}/v1"
        for w in workers:
            args += ["--worker", w]
        if pipelines:
            command = ["-c", "import sys, redis; redis.__version__ = '0.0.0'; from cli.main import main; "
                             "sys.exit(main(sys.argv[1:]))", *args]
        elif tree is not None and (tree / "fareway" / "cli.py").exists():
            command = ["-m", "fareway.cli", *args]  # a checkout from before the command line moved to cli/
        else:
            command = ["-m", "cli", *args]
        self._spawn(command, name, threads=1, tree=tree)
        return f"127.0.0.1:{port}"

    def check(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None:
                log_tail = (self.data / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{child.args} exited with {child.returncode}; the end of its log "
                                   f"(the data directory goes with the run):\n{log_tail}")

    def stop(self, names: list[str] | None = None) -> None:
        """Stops the named processes (all by default) and waits for them."""
        stopping = [c for name, c in self.children.items() if names is None or name in names]
        for child in stopping:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in stopping:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        for name in [n for n, c in self.children.items() if c in stopping]:
            del self.children[name]


async def wait_worker(procs: Processes, address: str) -> wpb.GetModelInfoResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for _ in range(1200):
            procs.check()
            try:
                return await stub.GetModelInfo(wpb.GetModelInfoRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise TimeoutError(f"worker {address} did not start")


async def wait_gateway(procs: Processes, address: str, key: str, model: str, num_workers: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(1200):
            procs.check()
            try:
                models = await stub.ListModels(ipb.ListModelsRequest(), timeout=1,
                                               metadata=(("authorization", f"Bearer {key}"),))
                if any(m.id == model and m.num_workers == num_workers for m in models.models):
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"gateway {address} did not see its {num_workers} workers")


async def tenant(redis_url: str, team: str) -> str:
    """A key for `team`, with generous rate limits and a budget (so both scripts run on every request)."""
    from fareway.quota import Budget, Budgets, Limits, LimitStore
    redis = connect(redis_url)
    try:
        key, _ = await KeyStore(redis).create(team, "bench", Role.TENANT)
        await LimitStore(redis).set(Limits(team, requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000,
                                           max_concurrent_requests=10_000))
        await Budgets(redis).set(Budget(team, hard_usd=1_000_000.0))
        return key
    finally:
        await redis.aclose()


# --- 1 and 2: overhead and requests per second ---------------------------------------------------

class Sides:
    """One 1-token request, sent to the worker directly or through a gateway: this one, one whose Redis
    calls go through pipelines, and (if given) another checkout's."""

    def __init__(self, worker: str, gateways: dict[str, str], key: str, team: str, model: str,
                 http_url: str) -> None:
        self.http_url = http_url
        self.http = aiohttp.ClientSession()
        self.http_body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        self.http_headers = {"Authorization": f"Bearer {key}"}
        self.worker_channel = grpc.aio.insecure_channel(worker)
        self.worker = worker_pb2_grpc.WorkerServiceStub(self.worker_channel)
        self.gateway_channels = {name: grpc.aio.insecure_channel(address) for name, address in gateways.items()}
        self.gateways = {name: inference_pb2_grpc.InferenceServiceStub(c) for name, c in self.gateway_channels.items()}
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.sampling = ipb.SamplingParams(max_tokens=1, temperature=0)
        self.model, self.salt = model, f"team:{team}"  # the salt the gateway would send: the same cache

    async def direct(self) -> None:
        request = wpb.GenerateRequest(request_id=uuid.uuid4().hex, model=self.model, prompt=PROMPT,
                                      sampling=self.sampling, cache_salt=self.salt)
        # The call the gateway itself makes for a unary request: the cheapest way to ask a worker.
        response = await self.worker.Complete(request, timeout=30)
        assert response.usage.completion_tokens == 1, response

    def through(self, gateway: str) -> Callable[[], Awaitable[None]]:
        """The request through the named gateway."""
        return lambda: self.through_gateway(gateway=gateway)

    async def through_gateway(self, request_id: str = "", gateway: str = "gateway") -> None:
        response = await self.gateways[gateway].Generate(
            ipb.GenerateRequest(model=self.model, prompt=PROMPT, sampling=self.sampling, request_id=request_id),
            metadata=self.metadata, timeout=30)
        assert response.usage.completion_tokens == 1 and response.request_id, response

    async def through_http(self) -> None:
        """The same request through the gateway's OpenAI-compatible edge."""
        async with self.http.post(f"{self.http_url}/completions", json=self.http_body,
                                  headers=self.http_headers) as response:
            body = await response.json()
        assert response.status == 200 and body["usage"]["completion_tokens"] == 1, body

    async def idempotent(self) -> None:
        """Through the gateway with a request_id: its claim, and its outcome stored before the answer."""
        await self.through_gateway(uuid.uuid4().hex)

    async def close(self) -> None:
        await self.http.close()
        await self.worker_channel.close()
        for channel in self.gateway_channels.values():
            await channel.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latencies(sides: Sides, samples: int) -> dict[str, list[float]]:
    calls = {"direct": sides.direct, "gateway": sides.through_gateway, "idempotent": sides.idempotent,
             "http": sides.through_http, **{name: sides.through(name) for name in sides.gateways if name != "gateway"}}
    # warm-up: channels, the limits and key caches, the worker's prefix cache
    return await alternating(calls, samples, warmups=30)


async def rate(call, seconds: float, concurrency: int = CONCURRENCY,  # noqa: ANN001 - async () -> None
               counted: list[int] | None = None) -> float:
    """Completed requests per second with `concurrency` clients calling back to back (their number is
    appended to `counted`)."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1
    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    if counted is not None:
        counted.append(done)
    return done / (time.perf_counter() - began)


async def rates(sides: Sides, rounds: int, seconds: float, pids: dict[str, int]) -> dict[str, list[float]]:
    """Requests per second of each side, in rounds of alternating order; "<gateway>_cpu_ms" has each
    gateway process's CPU per request in its rounds ("http": the HTTP edge of the "gateway" process)."""
    calls = {"direct": sides.direct, **{name: sides.through(name) for name in sides.gateways},
             "http": sides.through_http}
    pids = {**pids, "http": pids["gateway"]}
    for call in calls.values():
        await rate(call, 1.0)
    out: dict[str, list[float]] = {name: [] for name in calls} | {f"{name}_cpu_ms": [] for name in calls
                                                                   if name != "direct"}
    names = list(calls)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else list(reversed(names))):
            if name == "direct":
                out[name].append(await rate(sides.direct, seconds))
                continue
            counted: list[int] = []
            cpu = cpu_seconds(pids[name])
            out[name].append(await rate(calls[name], seconds, counted=counted))
            out[f"{name}_cpu_ms"].append((cpu_seconds(pids[name]) - cpu) * 1000 / counted[0])
    return out


# --- 3: prefix affinity vs round robin ------------------------------------------------------------

WORDS = ("account invoice policy refund shipping order customer product warranty support ticket region "
         "billing plan upgrade discount payment method address delivery return exchange size colour stock "
         "manager escalate priority response template tone concise friendly formal summary").split()
TOPICS = ("a late delivery", "a damaged parcel", "changing my plan", "a double charge", "my password",
          "a refund", "the warranty", "an invoice copy", "a discount code", "moving house")


def system_prompts(count: int) -> list[str]:
    rng = random.Random(6)
    return [f"You are support assistant number {i}. Follow these rules. "
            + " ".join(rng.choice(WORDS) for _ in range(220)) for i in range(count)]


def workload(num_requests: int, seed: int) -> list[tuple[int, int, str]]:
    """(team index, system prompt index, user question), in a shuffled order."""
    rng = random.Random(seed)
    return [(rng.randrange(TEAMS), rng.randrange(SYSTEM_PROMPTS),
             f"Question {n}: what should I do about {rng.choice(TOPICS)}? Reference {rng.randrange(10**6)}.")
            for n in range(num_requests)]


async def affinity_run(gateways: list[str], keys: list[str], prompts: list[str], work: list[tuple[int, int, str]],
                       model: str) -> tuple[float, float]:
    """(fleet prefix-cache hit rate, requests per second) of one run of the workload; with several
    gateway replicas, the clients take turns between them (as behind a load balancer)."""
    channels = [grpc.aio.insecure_channel(g) for g in gateways]
    try:
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
        queue = list(reversed(work))
        prompt_tokens = cached_tokens = 0

        async def client(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
            nonlocal prompt_tokens, cached_tokens
            while queue:
                team, system, question = queue.pop()
                chat = ipb.ChatMessages(messages=[ipb.ChatMessage(role="system", content=prompts[system]),
                                                  ipb.ChatMessage(role="user", content=question)])
                response = await stub.Generate(
                    ipb.GenerateRequest(model=model, chat=chat,
                                        sampling=ipb.SamplingParams(max_tokens=AFFINITY_MAX_TOKENS, temperature=0)),
                    metadata=(("authorization", f"Bearer {keys[team]}"),), timeout=120)
                prompt_tokens += response.usage.prompt_tokens
                cached_tokens += response.usage.cached_tokens
        began = time.perf_counter()
        await asyncio.gather(*(client(stubs[i % len(stubs)]) for i in range(AFFINITY_CONCURRENCY)))
        elapsed = time.perf_counter() - began
    finally:
        for channel in channels:
            await channel.close()
    return cached_tokens / prompt_tokens, len(work) / elapsed


# --- the run ---------------------------------------------------------------------------------------

async def run(quick: bool, baseline: Path | None = None) -> dict[str, object]:
    samples, rounds, seconds = (100, 2, 3.0) if quick else (300, 3, 6.0)
    affinity_requests, affinity_rounds = (72, 2) if quick else (144, 3)
    tok = tokenizer()
    prompts = system_prompts(SYSTEM_PROMPTS)
    prefix_tokens = sum(len(tok.encode(p)) for p in prompts) * TEAMS
    affinity_kv = int(KV_FRACTION * prefix_tokens) * kv_bytes_per_token("small")

    with tempfile.TemporaryDirectory(prefix="fwbench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", port=free_port()) as server:
        procs = Processes(Path(tmp), server.url)
        try:
            # Phases 1 and 2 first, with no other worker or gateway running to take the CPU.
            tiny = procs.worker("tiny", 32 << 20, "tiny-0")
            info = await wait_worker(procs, tiny)
            fronts = {"gateway": procs.gateway([tiny], "round-robin", "gateway", http=True),
                      "pipelines": procs.gateway([tiny], "round-robin", "pipelines", pipelines=True)}
            if baseline is not None:
                fronts["baseline"] = procs.gateway([tiny], "round-robin", "baseline", tree=baseline)
            key = await tenant(server.url, "bench")
            for address in fronts.values():
                await wait_gateway(procs, address, key, info.model, 1)
            sides = Sides(tiny, fronts, key, "bench", info.model, procs.http_urls["gateway"])
            lat = await latencies(sides, samples)
            rps = await rates(sides, rounds, seconds, procs.pids)
            await sides.close()
            procs.stop(["tiny-0", *fronts])

            fleet = [procs.worker("small", affinity_kv, f"small-{i}") for i in range(4)]
            pair = fleet[:2]
            roomy = procs.worker("small", 2 * prefix_tokens * kv_bytes_per_token("small"), "small-roomy")
            small_info = [await wait_worker(procs, w) for w in fleet]
            await wait_worker(procs, roomy)
            # One gateway alone needs no shared homes, and these gateways front different fleets of the same
            # model: sharing one home table would let one fleet's homes skew the other's (README, Routing).
            alone = "--no-shared-prefix-homes"
            routed = {policy: [procs.gateway(pair, policy, f"gateway-{policy}", alone)]
                      for policy in ("prefix-affinity", "round-robin")}
            routed["ideal"] = [procs.gateway([roomy], "round-robin", "gateway-ideal")]
            # Two gateway replicas in front of the same workers, agreeing on prefix homes through Redis
            # (the default) or each keeping its own.
            routed["replicas-shared"] = [procs.gateway(pair, "prefix-affinity", f"gateway-shared-{i}")
                                         for i in range(2)]
            routed["replicas-own"] = [procs.gateway(pair, "prefix-affinity", f"gateway-own-{i}",
                                                    "--no-shared-prefix-homes") for i in range(2)]
            # A fleet of 4 of the same workers: round-robin spreads every prefix over more caches.
            for policy in ("prefix-affinity", "round-robin"):
                routed[f"{policy}-4"] = [procs.gateway(fleet, policy, f"gateway-{policy}-4", alone)]
            for policy, addresses in routed.items():
                num_workers = 1 if policy == "ideal" else 4 if policy.endswith("-4") else 2
                for address in addresses:
                    await wait_gateway(procs, address, key, small_info[0].model, num_workers)

            hits: dict[str, list[float]] = {p: [] for p in routed}
            throughput: dict[str, list[float]] = {p: [] for p in routed}
            # Warm-up (its own teams): the gateways' and workers' code paths, not their caches.
            for policy, addresses in routed.items():
                keys = [await tenant(server.url, f"warm-{policy}-{t}") for t in range(TEAMS)]
                await affinity_run(addresses, keys, prompts, workload(12, 0), small_info[0].model)
            for i in range(affinity_rounds):
                order = list(routed) if i % 2 == 0 else list(reversed(routed))
                for policy in order:
                    # Fresh teams: nothing this run sends is in any worker's cache (the salt is the team).
                    keys = [await tenant(server.url, f"r{i}-{policy}-{t}") for t in range(TEAMS)]
                    hit, rate_ = await affinity_run(routed[policy], keys, prompts, workload(affinity_requests, i),
                                                    small_info[0].model)
                    hits[policy].append(hit)
                    throughput[policy].append(rate_)
            procs.check()
        finally:
            procs.stop()

    p50 = {k: percentile(v, 0.5) for k, v in lat.items()}
    p99 = {k: percentile(v, 0.99) for k, v in lat.items()}
    rps_m = {k: statistics.median(v) for k, v in rps.items()}
    hit_m = {k: statistics.median(v) for k, v in hits.items()}
    tput_m = {k: statistics.median(v) for k, v in throughput.items()}
    aff, rr = "prefix-affinity", "round-robin"
    compared = {}
    for other in ("pipelines", "baseline"):
        if other in p50:
            compared |= {
                f"{other}_p50_ms": round(p50[other], 3),
                f"{other}_overhead_p50_ms": round(p50[other] - p50["direct"], 3),
                f"{other}_p50_vs_direct": round(p50[other] / p50["direct"], 2),
                f"gateway_p50_vs_{other}": round(p50["gateway"] / p50[other], 3),
                f"{other}_requests_per_s": round(rps_m[other]),
                f"{other}_cpu_ms_per_request": round(rps_m[f"{other}_cpu_ms"], 3),
                f"gateway_cpu_vs_{other}": round(rps_m["gateway_cpu_ms"] / rps_m[f"{other}_cpu_ms"], 3),
            }
    return {
        "bench": "gateway",
        "overhead_p50_ms": round(p50["gateway"] - p50["direct"], 3),
        "overhead_p99_ms": round(p99["gateway"] - p99["direct"], 3),
        "requests_per_s": round(rps_m["gateway"]),
        "affinity_hit_rate_vs_round_robin": round(hit_m[aff] / hit_m[rr], 2) if hit_m[rr] else None,
        "affinity_throughput_vs_round_robin": round(tput_m[aff] / tput_m[rr], 2),
        "direct_p50_ms": round(p50["direct"], 3), "direct_p99_ms": round(p99["direct"], 3),
        "gateway_p50_ms": round(p50["gateway"], 3), "gateway_p99_ms": round(p99["gateway"], 3),
        "gateway_p50_vs_direct": round(p50["gateway"] / p50["direct"], 2),
        "idempotent_overhead_p50_ms": round(p50["idempotent"] - p50["direct"], 3),
        "http_p50_ms": round(p50["http"], 3), "http_p99_ms": round(p99["http"], 3),
        "http_overhead_p50_ms": round(p50["http"] - p50["direct"], 3),
        "http_p50_vs_direct": round(p50["http"] / p50["direct"], 2),
        "http_overhead_vs_grpc_overhead": round((p50["http"] - p50["direct"]) / (p50["gateway"] - p50["direct"]), 2),
        "http_requests_per_s": round(rps_m["http"]),
        "http_cpu_ms_per_request": round(rps_m["http_cpu_ms"], 3),
        "http_cpu_vs_grpc_cpu": round(rps_m["http_cpu_ms"] / rps_m["gateway_cpu_ms"], 2),
        "idempotent_p50_vs_direct": round(p50["idempotent"] / p50["direct"], 2),
        "latency_samples": samples,
        "direct_requests_per_s": round(rps_m["direct"]),
        "requests_per_s_vs_direct": round(rps_m["gateway"] / rps_m["direct"], 3),
        "gateway_cpu_ms_per_request": round(rps_m["gateway_cpu_ms"], 3),
        "requests_per_s_per_gateway_core": round(1000 / rps_m["gateway_cpu_ms"]),
        "concurrency": CONCURRENCY,
        "affinity_hit_rate": round(hit_m[aff], 4), "round_robin_hit_rate": round(hit_m[rr], 4),
        "ideal_hit_rate": round(hit_m["ideal"], 4),
        "affinity_hit_rate_vs_ideal": round(hit_m[aff] / hit_m["ideal"], 3),
        "ideal_hit_rate_vs_round_robin": round(hit_m["ideal"] / hit_m[rr], 2) if hit_m[rr] else None,
        "affinity_requests_per_s": round(tput_m[aff], 2), "round_robin_requests_per_s": round(tput_m[rr], 2),
        "affinity_requests_per_run": affinity_requests, "affinity_runs": affinity_rounds,
        "four_workers_affinity_hit_rate": round(hit_m[aff + "-4"], 4),
        "four_workers_round_robin_hit_rate": round(hit_m[rr + "-4"], 4),
        "four_workers_affinity_hit_rate_vs_round_robin": round(hit_m[aff + "-4"] / hit_m[rr + "-4"], 2),
        "four_workers_affinity_throughput_vs_round_robin": round(tput_m[aff + "-4"] / tput_m[rr + "-4"], 2),
        "two_replicas_shared_homes_hit_rate": round(hit_m["replicas-shared"], 4),
        "two_replicas_own_homes_hit_rate": round(hit_m["replicas-own"], 4),
        "shared_homes_vs_own_hit_rate": round(hit_m["replicas-shared"] / hit_m["replicas-own"], 2),
        "prefix_tokens": prefix_tokens, "kv_capacity_tokens_per_worker": small_info[0].kv_capacity_tokens,
        "cpu_count": os.cpu_count(),
        **compared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter rounds (~45 s)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also measure the gateway of the checkout in DIR, alternating with this one's")
    parser.add_argument("--serve-worker", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--kv-bytes", type=int, default=32 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker is not None:
        asyncio.run(serve_worker(args.serve_worker, args.size, args.kv_bytes, args.worker_id))
        return
    from bench.common import print_results
    f = asyncio.run(run(args.quick, args.baseline))
    rows = [
        ("setup", f"{f['cpu_count']} cores shared by the client, redis-server, `fareway gateway` and the workers "
                  "(separate processes): absolute figures are this machine's, ratios are the result"),
        ("1-token request, worker directly", f"p50 {f['direct_p50_ms']:.2f} ms, p99 {f['direct_p99_ms']:.2f} ms "
                                             f"({f['latency_samples']} alternating samples)"),
        ("same, through the gateway", f"p50 {f['gateway_p50_ms']:.2f} ms, p99 {f['gateway_p99_ms']:.2f} ms "
                                      "(auth, rate limits, budget, accounting on; real Redis)"),
        ("gateway overhead", f"p50 +{f['overhead_p50_ms']:.2f} ms (target <= 2 ms), "
                             f"p99 +{f['overhead_p99_ms']:.2f} ms; p50 {f['gateway_p50_vs_direct']:.2f}x direct"),
        ("same, with a request_id", f"p50 +{f['idempotent_overhead_p50_ms']:.2f} ms, "
                                    f"{f['idempotent_p50_vs_direct']:.2f}x direct (its claim, and its outcome "
                                    "stored before the answer)"),
        ("same, through the HTTP edge", f"p50 {f['http_p50_ms']:.2f} ms, p99 {f['http_p99_ms']:.2f} ms: overhead "
                                        f"+{f['http_overhead_p50_ms']:.2f} ms, {f['http_overhead_vs_grpc_overhead']:.2f}x "
                                        "the gRPC edge's (target <= 1.5x); "
                                        f"{f['http_cpu_ms_per_request']:.2f} ms gateway CPU per request "
                                        f"({f['http_cpu_vs_grpc_cpu']:.2f}x gRPC's), {f['http_requests_per_s']:,} requests/s"),
        (f"requests/s, {f['concurrency']} clients, directly", f"{f['direct_requests_per_s']:,}"),
        (f"requests/s, {f['concurrency']} clients, one gateway", f"{f['requests_per_s']:,} "
                                                                f"({f['requests_per_s_vs_direct']:.2f}x direct; "
                                                                "target >= 1,000)"),
        ("gateway CPU per request", f"{f['gateway_cpu_ms_per_request']:.2f} ms at {f['concurrency']} clients: "
                                    f"one core would sustain ~{f['requests_per_s_per_gateway_core']:,} requests/s "
                                    "if the gateway had it to itself"),
        ("same, Redis calls through redis-py pipelines",
         f"p50 +{f['pipelines_overhead_p50_ms']:.2f} ms, {f['pipelines_cpu_ms_per_request']:.2f} ms CPU per request: "
         f"the batcher's own connection is {f['gateway_p50_vs_pipelines']:.3f}x its p50 and "
         f"{f['gateway_cpu_vs_pipelines']:.3f}x its CPU"),
        *([("the --baseline checkout's gateway",
            f"p50 +{f['baseline_overhead_p50_ms']:.2f} ms ({f['baseline_p50_vs_direct']:.2f}x direct), "
            f"{f['baseline_cpu_ms_per_request']:.2f} ms CPU per request, {f['baseline_requests_per_s']:,} requests/s: "
            f"this checkout is {f['gateway_p50_vs_baseline']:.3f}x its p50 and {f['gateway_cpu_vs_baseline']:.3f}x "
            "its CPU")] if "baseline_p50_ms" in f else []),
        ("2 workers, prefix-affinity", f"hit rate {f['affinity_hit_rate']:.1%}, "
                                       f"{f['affinity_requests_per_s']:.1f} requests/s"),
        ("2 workers, round-robin", f"hit rate {f['round_robin_hit_rate']:.1%}, "
                                   f"{f['round_robin_requests_per_s']:.1f} requests/s"),
        ("1 roomy worker (the limit)", f"hit rate {f['ideal_hit_rate']:.1%}: affinity reaches "
                                       f"{f['affinity_hit_rate_vs_ideal']:.0%} of it; it is "
                                       f"{f['ideal_hit_rate_vs_round_robin']}x round-robin's"),
        ("4 workers, prefix-affinity vs round-robin", f"hit rate {f['four_workers_affinity_hit_rate']:.1%} vs "
                                                       f"{f['four_workers_round_robin_hit_rate']:.1%}: "
                                                       f"{f['four_workers_affinity_hit_rate_vs_round_robin']}x; "
                                                       "throughput "
                                                       f"{f['four_workers_affinity_throughput_vs_round_robin']:.2f}x"),
        ("2 gateway replicas, prefix-affinity", f"hit rate {f['two_replicas_shared_homes_hit_rate']:.1%} with "
                                                 "homes shared through Redis, "
                                                 f"{f['two_replicas_own_homes_hit_rate']:.1%} with each its own "
                                                 f"({f['shared_homes_vs_own_hit_rate']}x)"),
        ("affinity vs round-robin", f"hit rate {f['affinity_hit_rate_vs_round_robin']}x (target >= 2x), "
                                    f"throughput {f['affinity_throughput_vs_round_robin']:.2f}x; "
                                    f"{TEAMS} teams x {SYSTEM_PROMPTS} system prompts = {f['prefix_tokens']:,} prefix "
                                    f"tokens, {f['kv_capacity_tokens_per_worker']:,} KV tokens per worker, "
                                    f"{f['affinity_requests_per_run']} requests x {f['affinity_runs']} runs each"),
    ]
    print_results("gateway: overhead, throughput and prefix-affinity routing", rows, f)


if __name__ == "__main__":
    main()
