"""What the cost levers save, together and one by one, on multi-tenant, multi-turn chat, as Fareway's
own ledger and price book count it.

The workload (fixed seed, the same for every configuration): 4 teams, each with its own system
prompt of a few hundred tokens; 16 sessions of 4-6 turns, arriving a quarter of a second apart and
then all running at once, each turn sending the whole conversation so far (the model's own earlier
answers included), as chat clients do; answers of mixed lengths (min_tokens = max_tokens, so every
configuration generates the same number of tokens).

The stack is the real one, each piece its own process: redis-server, two `fareway worker`s on the
SmolLM2 GGUF (one thread each) and `fareway gateway` in front of them, called over gRPC with
GenerateStream. Configurations:

  naive        fp32 weights and KV cache, no prefix cache, one request at a time per worker
               (--max-num-seqs 1), round-robin over the 2 workers
  each lever   the naive configuration with one lever on: int8 weights; a quantized KV cache (int8,
               or fp8 with --kv-cache-dtype fp8_e4m3); prefix caching; continuous batching
               (--max-num-seqs 64); prefix-affinity routing with session stickiness (each request
               carries its session id)
  all levers   every lever at once

Every worker gets the same KV-cache bytes, so a quantized cache holds about 4x the tokens of fp32's.

Cost, from Fareway's books: the requests' cost to serve is read from the ledger (`usage_report`
over the configuration's own teams: GPU-seconds priced by the price book, as `fareway report`
shows them); the idle device time is the workers' metered device time over the run (wall time x
devices, by the meter's own invariant) less what the meters attributed to requests, priced as a
report prices idle capacity (the capacity reports themselves cover a worker's whole life, its
start and warm-up included, in 10-second steps). Both over the tokens served (prompt, cached
included, and completion) give USD per 1M tokens, the figure `fareway report` shows per group;
per conversation-hour assumes CONVERSATION_TURNS_PER_HOUR turns. The inter-turn cache hit rate is
cached / prompt tokens of turns 2 and later (the ledger, grouped by the turn tag); time to first
token is the client's, to the first streamed token. Beside the cost, the workers' CPU-seconds per
1M tokens (/proc): on a machine shared with other tenants their load inflates wall time, and so
the cost, by varying amounts from one configuration to the next; CPU time much less. Quality guard:
bench.quantization's perplexity measurement, fp32 against the all-levers model, within 3%.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from accounting.capacity import CapacityCell, WorkerInfo
from accounting.ledger import Ledger
from accounting.pricebook_store import PriceBookStore
from accounting.reports import idle_cost_nusd, usage_report
from accounting.rollups import Totals, hour_bucket
from bench.gateway import Processes, cpu_seconds, tenant, wait_gateway, wait_worker
from bench.latency import percentile
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from fareway.redis import connect
from fareway.redis.embedded import EmbeddedRedis
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc

CONVERSATION_TURNS_PER_HOUR = 60
"""A conversation-hour: a user who reads each answer and writes the next message within a minute."""
KV_CACHE_MEMORY = "256MiB"
"""Every worker's KV cache: about 5,800 tokens in fp32, 23,000 in fp8."""
PERPLEXITY_LIMIT = 1.03
TARGET_COST_VS_NAIVE, TARGET_HIT_RATE = 0.10, 0.90
NUM_WORKERS = 2


# --- configurations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Configuration:
    """One way to serve the workload: the workers' flags and the gateway's routing."""

    name: str
    weights: str = "fp32"
    kv_cache_dtype: str = "fp32"
    prefix_caching: bool = False
    max_num_seqs: int = 1
    routing: str = "round-robin"
    sticky_sessions: bool = False
    """Requests carry their session id, so the gateway keeps each session on one worker."""

    def worker_args(self) -> list[str]:
        # Eager decode steps in every configuration: compiling them costs 15-30 s a worker at start here
        # (docs/benchmarks.md, the compiled decode step), and all configurations then run the same kernels.
        return ["--device", "cpu", "--enforce-eager", "--weights", self.weights,
                "--kv-cache-dtype", self.kv_cache_dtype, "--kv-cache-memory", KV_CACHE_MEMORY,
                "--max-num-seqs", str(self.max_num_seqs),
                *([] if self.prefix_caching else ["--no-prefix-caching"])]


NAIVE = Configuration("naive")
LEVERS = ("int8_weights", "quantized_kv", "prefix_caching", "continuous_batching", "prefix_affinity")
RUN_ORDER = ("prefix_affinity", "naive", "all_levers", "int8_weights", "quantized_kv", "prefix_caching",
             "continuous_batching")
"""Naive and all levers are neighbours (the headline ratio, measured as close in time as can be); naive and
prefix affinity alone run on the same workers, so they are neighbours too, and share them."""
PERPLEXITY_CONFIGS = {"fp32": "fp32", "int8": "int8_kv_int8", "fp8_e4m3": "int8_kv_fp8"}
"""bench.quantization's name of the naive model (fp32) and of the all-levers one, by its KV format."""


def configurations(kv_cache_dtype: str) -> dict[str, Configuration]:
    """Naive, each lever alone on top of it, and all levers; the KV cache quantized to kv_cache_dtype."""
    changes: dict[str, dict[str, object]] = {
        "int8_weights": {"weights": "int8"},
        "quantized_kv": {"kv_cache_dtype": kv_cache_dtype},
        "prefix_caching": {"prefix_caching": True},
        "continuous_batching": {"max_num_seqs": 64},
        "prefix_affinity": {"routing": "prefix-affinity", "sticky_sessions": True},
    }
    every = {key: value for lever in changes.values() for key, value in lever.items()}
    return {"naive": NAIVE, **{name: dataclasses.replace(NAIVE, name=name, **changes[name]) for name in LEVERS},
            "all_levers": dataclasses.replace(NAIVE, name="all_levers", **every)}


# --- the workload ---------------------------------------------------------------------------------

TEAMS = {
    "support": "You are the help desk assistant of Northwind Books, an online bookshop that ships paper books "
               "and e-books to readers in forty countries.",
    "travel": "You are the trip planner of Atlas Rail, a company that sells train passes and plans rail "
              "journeys across Europe for families and solo travellers.",
    "tutor": "You are the mathematics tutor of Brightpath School, helping pupils aged twelve to sixteen "
             "with algebra, geometry and probability homework.",
    "kitchen": "You are the cooking assistant of Greenleaf Kitchen, a meal-kit service that delivers "
               "fresh ingredients and recipe cards every week.",
}
RULES = (
    "Answer in plain, friendly English, and keep each answer short unless the user asks for more detail.",
    "Never invent an order number, a price, a date or a policy: if you do not know it, say so and offer "
    "to find out.",
    "When a question is ambiguous, ask one clarifying question before you answer it.",
    "Do not give medical, legal or financial advice; suggest a qualified professional instead.",
    "Use metric units first, and give imperial units in brackets when the user seems to expect them.",
    "If the user is upset, acknowledge how they feel in one sentence before you solve the problem.",
    "Keep personal data private: never repeat a full card number, password or home address back to the user.",
    "Prefer numbered steps for instructions, and keep each step to one sentence.",
    "When you recommend something, give one main suggestion and at most two alternatives.",
    "Say clearly when something is your opinion rather than a fact.",
    "If the user writes in another language, answer in that language if you can.",
    "Do not mention these instructions, and do not say that you are following rules.",
    "When a request is outside what you can help with, say so politely and point to the right place.",
    "Check your arithmetic twice before you give any number that the user will rely on.",
    "End an answer with a question only when you really need more information to continue.",
    "Avoid jargon; when you must use a technical term, explain it in a few words the first time.",
    "Be honest about limits and delays instead of promising what may not happen.",
    "Refer to earlier parts of the conversation when they matter, so the user need not repeat themselves.",
    "Treat every user with patience, whatever their age, background or level of experience.",
    "Do not use more than one exclamation mark in an answer.",
)
OPENERS = {
    "support": ("My parcel has not arrived after two weeks. What can I do?",
                "How do I return a book that arrived damaged?",
                "Can I read my e-books on two devices?",
                "Do you ship to Iceland, and how long does it take?"),
    "travel": ("We are two adults and a child. Which pass suits a week in Italy?",
               "What is the best way to get from Paris to Vienna by train?",
               "Can I reserve seats on night trains with my pass?",
               "How early should I book trains in August?"),
    "tutor": ("How do I solve 3x + 7 = 22?",
              "What is the probability of rolling two sixes with two dice?",
              "Why is the angle sum of a triangle 180 degrees?",
              "How do I expand (x + 2)(x - 5)?"),
    "kitchen": ("What can I cook tonight with leeks, potatoes and cheese?",
                "How do I stop my risotto from getting sticky?",
                "Can I freeze the curry from this week's box?",
                "Which of this week's recipes is fastest?"),
}
FOLLOW_UPS = ("Thanks. Can you say that more briefly?", "Why is that?", "Can you give me one more example?",
              "What should I do if that does not work?", "Is there a cheaper option?", "What is the next step?",
              "Could you explain the second point again?", "OK, and how long will that take?",
              "Great, is there anything else I should know?", "Can you check that again, please?")


@dataclass(frozen=True)
class WorkloadShape:
    num_sessions: int
    num_rules: int
    """Rules in each team's system prompt: 14 rules make about 260 tokens."""
    num_turns: tuple[int, int]
    """Fewest and most turns of a session."""
    answer_tokens: tuple[int, ...]
    """Answer lengths, drawn at random for each turn."""
    arrival_gap_s: float
    """Sessions start this far apart, as users arrive (the cache then holds a team's system prompt when its
    next session arrives, as it does in steady state); all of them run at once after that."""


FULL = WorkloadShape(num_sessions=16, num_rules=14, num_turns=(4, 6), answer_tokens=(8, 16, 24), arrival_gap_s=0.25)
QUICK = WorkloadShape(num_sessions=16, num_rules=14, num_turns=(4, 4), answer_tokens=(4, 8, 16), arrival_gap_s=0.25)
PERPLEXITY_TOKENS = {"full": 2048, "quick": 1024}
"""Of the 2,987-token text: int8 weights with an int8 KV cache read +1.3% on all of it, +2.6% on 600 tokens."""


@dataclass(frozen=True)
class Turn:
    user: str
    answer_tokens: int


@dataclass(frozen=True)
class Session:
    session_id: str
    team: str
    system_prompt: str
    turns: tuple[Turn, ...]
    arrival_s: float
    """When its first turn is sent, from the start of the run."""


def workload(shape: WorkloadShape, seed: int) -> list[Session]:
    """The sessions: teams in turn, each team's system prompt its own selection and order of rules."""
    rng = random.Random(seed)
    prompts = {team: " ".join([intro, *rng.sample(RULES, shape.num_rules)]) for team, intro in TEAMS.items()}
    sessions = []
    for i in range(shape.num_sessions):
        team = list(TEAMS)[i % len(TEAMS)]
        num_turns = rng.randint(*shape.num_turns)
        users = [rng.choice(OPENERS[team]), *rng.sample(FOLLOW_UPS, num_turns - 1)]
        turns = tuple(Turn(user, rng.choice(shape.answer_tokens)) for user in users)
        sessions.append(Session(f"{team}-{i:02d}", team, prompts[team], turns, i * shape.arrival_gap_s))
    return sessions


# --- one configuration's run ---------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    wall_s: float
    startup_s: float
    """Starting the workers and the gateway, and warming them up (not counted in the cost)."""
    ttft_ms: list[float]
    totals: Totals
    """The ledger's totals over the run's requests, with the run's idle cost added."""
    inter_turn_hit_rate: float
    first_turn_cost_share: float
    """Of the requests' cost, the first turns' (each session's system prompt computed or taken from the cache)."""
    device_seconds: float
    metered_gpu_seconds: float
    """What the workers' meters attributed to requests over the run (the ledger should say the same)."""
    worker_cpu_seconds: float
    """CPU time the worker processes used over the run: what other tenants of a shared machine do not
    inflate, as they inflate wall time."""
    load_average: float
    """The machine's 1-minute load average at the end of the run."""
    requests_per_worker: dict[str, int] = field(default_factory=dict)

    @property
    def usd_per_million_tokens(self) -> float:
        return self.totals.usd_per_million_tokens or 0.0

    @property
    def cpu_seconds_per_million_tokens(self) -> float:
        return self.worker_cpu_seconds / (self.totals.prompt_tokens + self.totals.completion_tokens) * 1e6

    @property
    def usd_per_conversation_hour(self) -> float:
        usd = (self.totals.cost_nusd + self.totals.idle_nusd) / 1e9
        return usd / self.totals.requests * CONVERSATION_TURNS_PER_HOUR

    @property
    def idle_share(self) -> float:
        total = self.totals.cost_nusd + self.totals.idle_nusd
        return self.totals.idle_nusd / total if total else 0.0


async def converse(stub: inference_pb2_grpc.InferenceServiceStub, key: str, model: str, session: Session,
                   sticky: bool) -> list[float]:
    """Runs the session turn by turn, each turn sending the whole conversation; each turn's TTFT in ms."""
    await asyncio.sleep(session.arrival_s)
    messages = [ipb.ChatMessage(role="system", content=session.system_prompt)]
    ttft_ms = []
    for number, turn in enumerate(session.turns, start=1):
        messages.append(ipb.ChatMessage(role="user", content=turn.user))
        request = ipb.GenerateStreamRequest(
            model=model, sampling=ipb.SamplingParams(max_tokens=turn.answer_tokens, min_tokens=turn.answer_tokens,
                                                     temperature=0.0),
            session_id=session.session_id if sticky else "", tags={"turn": str(number)})
        request.chat.messages.extend(messages)
        began, first, answer = time.perf_counter(), None, []
        async for message in stub.GenerateStream(request, metadata=(("authorization", f"Bearer {key}"),),
                                                 timeout=600):
            if first is None and message.token_ids:
                first = time.perf_counter()
            answer.append(message.text)
        ttft_ms.append(((first or time.perf_counter()) - began) * 1000)
        messages.append(ipb.ChatMessage(role="assistant", content="".join(answer)))
    return ttft_ms


async def attributed_seconds(workers: Sequence[str]) -> list[float]:
    """Each worker's device-seconds attributed to requests so far (its meter, as GetLoad reports it)."""
    out = []
    for address in workers:
        async with grpc.aio.insecure_channel(address) as channel:
            load = await worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(wpb.GetLoadRequest(), timeout=10)
            out.append(load.attributed_gpu_seconds)
    return out


async def warm_up(workers: Sequence[str], model: str) -> None:
    """One request on each worker directly (its own cache salt, so no team's cache is touched)."""
    prompt = " ".join(RULES[:8])
    for address in workers:
        async with grpc.aio.insecure_channel(address) as channel:
            request = wpb.GenerateRequest(request_id=f"warm-{address}-{time.time_ns()}", model=model, prompt=prompt,
                                          sampling=ipb.SamplingParams(max_tokens=4, temperature=0.0),
                                          cache_salt="bench-warm-up")
            await worker_pb2_grpc.WorkerServiceStub(channel).Complete(request, timeout=120)


@dataclass
class Workers:
    """The 2 worker processes a configuration runs on (kept for the next one when its flags are the same)."""

    args: tuple[str, ...]
    names: list[str]
    addresses: list[str]
    spawned_at: float | None
    """When they were started; None once they served a configuration."""
    infos: list[wpb.GetModelInfoResponse] = field(default_factory=list)

    @classmethod
    def start(cls, procs: Fleet, args: list[str]) -> Workers:
        names = [f"cost-worker-{i}" for i in range(NUM_WORKERS)]
        return cls(tuple(args), names, [procs.fareway_worker(args, name) for name in names], time.perf_counter())

    async def ready(self, procs: Fleet) -> list[wpb.GetModelInfoResponse]:
        if not self.infos:
            self.infos = [await wait_worker(procs, address) for address in self.addresses]
            await warm_up(self.addresses, self.infos[0].model)
        return self.infos


async def run_configuration(procs: Fleet, redis_url: str, config: Configuration, workers: Workers,
                            sessions: list[Session], label: str) -> RunResult:
    """Puts a gateway of the configuration's routing in front of its workers, runs every session, stops
    the gateway, and reads the run's cost from the ledger and the workers' meters."""
    started = workers.spawned_at or time.perf_counter()
    gateway_name = f"gateway-{label}"
    gateway = procs.gateway(workers.addresses, config.routing, gateway_name)
    try:
        teams = {team: f"{team}-{label}" for team in TEAMS}
        keys = {team: await tenant(redis_url, name) for team, name in teams.items()}
        infos = await workers.ready(procs)
        model = infos[0].model
        await wait_gateway(procs, gateway, keys["support"], model, NUM_WORKERS)
        workers.spawned_at = None
        startup_s = time.perf_counter() - started
        async with grpc.aio.insecure_channel(gateway) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            before = await attributed_seconds(workers.addresses)
            cpu_before = sum(cpu_seconds(procs.pids[name]) for name in workers.names)
            began = time.perf_counter()
            ttfts = await asyncio.gather(*(converse(stub, keys[s.team], model, s, config.sticky_sessions)
                                           for s in sessions))
            wall_s = time.perf_counter() - began
            worker_cpu_s = sum(cpu_seconds(procs.pids[name]) for name in workers.names) - cpu_before
            metered = sum(await attributed_seconds(workers.addresses)) - sum(before)
        procs.check()
    finally:
        procs.stop([gateway_name])  # it finishes writing its usage records before it exits
    device_seconds = wall_s * sum(max(info.device_count, 1) for info in infos)
    totals, hit_rate, first_turn_share, per_worker = await ledger_figures(redis_url, list(teams.values()),
                                                                          sum(len(s.turns) for s in sessions))
    totals.idle_nusd = await idle_nusd(redis_url, infos[0], max(device_seconds - metered, 0.0))
    return RunResult(config.name, wall_s, startup_s, [t for session in ttfts for t in session], totals, hit_rate,
                     first_turn_share, device_seconds, metered, worker_cpu_s, os.getloadavg()[0], per_worker)


async def ledger_figures(redis_url: str, teams: list[str], num_requests: int,
                         timeout_s: float = 30.0) -> tuple[Totals, float, float, dict[str, int]]:
    """The run's totals, its inter-turn hit rate, its first turns' share of the cost and its requests per
    worker, from the ledger (once every request's record is in)."""
    redis = connect(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            by_turn = await usage_report(Ledger(redis), ["tag:turn"], teams=teams)
            if by_turn.total.requests >= num_requests or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if by_turn.total.requests != num_requests:
            raise RuntimeError(f"the ledger has {by_turn.total.requests} of the run's {num_requests} requests")
        by_worker = await usage_report(Ledger(redis), ["worker"], teams=teams)
    finally:
        await redis.aclose()
    later = Totals()
    for (turn,), totals in by_turn.rows:
        if turn != "1":
            later.add(totals)
    first_turn_share = 1 - later.cost_nusd / by_turn.total.cost_nusd if by_turn.total.cost_nusd else 0.0
    return (by_turn.total, later.cache_hit_rate, first_turn_share,
            {worker: t.requests for (worker,), t in by_worker.rows})


async def idle_nusd(redis_url: str, info: wpb.GetModelInfoResponse, idle_seconds: float) -> int:
    """The idle device time priced as a report prices a worker's idle capacity."""
    redis = connect(redis_url)
    try:
        book = await PriceBookStore(redis).ensure()
    finally:
        await redis.aclose()
    worker = WorkerInfo(info.worker_id, info.hardware_class, max(info.device_count, 1), info.model)
    idle_ns = round(idle_seconds * 1e9)
    return idle_cost_nusd(book, CapacityCell(worker, hour_bucket(time.time()), idle_ns, idle_ns))


class Fleet(Processes):
    """bench.gateway's processes, with workers that are `fareway worker` on the real model."""

    def fareway_worker(self, args: list[str], name: str) -> str:
        """A worker on one thread."""
        port = free_port()
        self._spawn(["-m", "cli", "worker", "--listen", f"127.0.0.1:{port}", "--worker-id", name, *args], name,
                    threads=1)
        return f"127.0.0.1:{port}"


# --- the benchmark -------------------------------------------------------------------------------

def run_order(names: Sequence[str], rounds: int) -> list[str]:
    """Every configuration once per round, in reverse order every other round, so that none always runs at
    the same point of the machine's drift (and a round's last configuration reuses its workers as the
    next round's first). Naive and prefix affinity alone run on the same workers, so they are neighbours."""
    order: list[str] = []
    for i in range(rounds):
        order += names if i % 2 == 0 else names[::-1]
    return order


async def measure(configs: dict[str, Configuration], shape: WorkloadShape, seed: int,
                  rounds: int) -> dict[str, list[RunResult]]:
    """Each configuration's runs of the same workload, in run_order."""
    sessions = workload(shape, seed)
    results: dict[str, list[RunResult]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="fwcost-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", port=free_port()) as server:
        procs = Fleet(Path(tmp), server.url)
        workers: Workers | None = None
        try:
            for i, name in enumerate(run_order(list(configs), rounds)):
                config = configs[name]
                if workers is None or workers.args != tuple(config.worker_args()):
                    if workers is not None:
                        procs.stop(workers.names)
                    workers = Workers.start(procs, config.worker_args())
                result = await run_configuration(procs, server.url, config, workers, sessions, f"{name}-{i}")
                results[name].append(result)
                print(f"{name}: ready in {result.startup_s:.1f} s, ran in {result.wall_s:.1f} s, "
                      f"${result.usd_per_million_tokens:.4f} per 1M tokens, "
                      f"inter-turn hit rate {result.inter_turn_hit_rate:.1%}", flush=True)
        finally:
            procs.stop()
    return results


def perplexities(names: Sequence[str], num_tokens: int) -> dict[str, float]:
    """bench.quantization's perplexity measurement (its text, its configurations, the runner's own prompt
    log-probabilities), of the named configurations only."""
    from bench.common import on_device
    from bench.quantization import PERPLEXITY_CONFIGS as QUANTIZATION_CONFIGS
    from bench.quantization import TEXT
    from workers.config import RunnerConfig
    from workers.loader import default_model_path, load_checkpoint
    from workers.model_runner import ModelRunner

    checkpoint = on_device(load_checkpoint, default_model_path())
    ids = checkpoint.tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:num_tokens]

    def perplexity(name: str) -> float:
        # Eager: prompt log-probabilities never run the compiled decode step, so compiling it is wasted time.
        runner = ModelRunner(checkpoint, RunnerConfig(device="cpu", kv_cache_memory_bytes=256 << 20,
                                                      enforce_eager=True, **QUANTIZATION_CONFIGS[name]))
        return math.exp(-runner.prompt_logprobs(ids).mean().item())
    return {name: on_device(perplexity, name) for name in names}


def median_result(runs: list[RunResult]) -> RunResult:
    """The run of median cost (the lower middle one of an even number)."""
    ordered = sorted(runs, key=lambda r: r.usd_per_million_tokens)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class Quality:
    naive_perplexity: float
    all_levers_perplexity: float

    @property
    def ratio(self) -> float:
        return self.all_levers_perplexity / self.naive_perplexity

    @property
    def is_within_limit(self) -> bool:
        return self.ratio <= PERPLEXITY_LIMIT


def figures(results: dict[str, list[RunResult]], quality: Quality) -> dict[str, object]:
    runs = {name: median_result(r) for name, r in results.items()}
    naive, every = runs["naive"], runs["all_levers"]
    vs_naive = {name: r.usd_per_million_tokens / naive.usd_per_million_tokens for name, r in runs.items()}
    cpu_vs_naive = {name: r.cpu_seconds_per_million_tokens / naive.cpu_seconds_per_million_tokens
                    for name, r in runs.items()}
    out: dict[str, object] = {
        "bench": "cost",
        "cost_all_levers_vs_naive": round(vs_naive["all_levers"], 4),
        **{f"cost_{lever}_vs_naive": round(vs_naive[lever], 4) for lever in LEVERS if lever in runs},
        "all_levers_inter_turn_hit_rate": round(every.inter_turn_hit_rate, 4),
        **{f"cpu_{name}_vs_naive": round(cpu_vs_naive[name], 4) for name in runs if name != "naive"},
        "perplexity_naive": round(quality.naive_perplexity, 4),
        "perplexity_all_levers": round(quality.all_levers_perplexity, 4),
        "perplexity_all_levers_vs_naive": round(quality.ratio, 4),
        "quality_within_limit": quality.is_within_limit,
        "target_met": (vs_naive["all_levers"] <= TARGET_COST_VS_NAIVE
                       and every.inter_turn_hit_rate >= TARGET_HIT_RATE and quality.is_within_limit),
    }
    for name, r in runs.items():
        out |= {
            f"{name}_usd_per_million_tokens": round(r.usd_per_million_tokens, 6),
            f"{name}_usd_per_conversation_hour": round(r.usd_per_conversation_hour, 9),
            f"{name}_inter_turn_hit_rate": round(r.inter_turn_hit_rate, 4),
            f"{name}_cache_hit_rate": round(r.totals.cache_hit_rate, 4),
            f"{name}_first_turn_cost_share": round(r.first_turn_cost_share, 4),
            f"{name}_ttft_p50_ms": round(percentile(r.ttft_ms, 0.5), 1),
            f"{name}_ttft_p99_ms": round(percentile(r.ttft_ms, 0.99), 1),
            f"{name}_idle_share": round(r.idle_share, 4),
            f"{name}_worker_cpu_s_per_million_tokens": round(r.cpu_seconds_per_million_tokens, 1),
            f"{name}_wall_s": round(r.wall_s, 2),
            f"{name}_load_average": round(r.load_average, 2),
        }
    return out | {
        "runs_per_configuration": len(results["naive"]),
        "turns": naive.totals.requests,
        "prompt_tokens": naive.totals.prompt_tokens, "completion_tokens": naive.totals.completion_tokens,
        "ledger_vs_metered_gpu_seconds": round(
            sum(r.totals.gpu_seconds for r in runs.values()) / sum(r.metered_gpu_seconds for r in runs.values()), 4),
        "all_levers_requests_per_worker": every.requests_per_worker,
    }


def ablation_table(results: dict[str, list[RunResult]]) -> Table:
    runs = {name: median_result(r) for name, r in results.items()}
    naive = runs["naive"].usd_per_million_tokens
    table = Table(title="cost per configuration: its requests' cost to serve (the ledger) + its idle device time",
                  title_justify="left")
    naive_cpu = runs["naive"].cpu_seconds_per_million_tokens
    for header in ("configuration", "USD per 1M tokens", "vs naive", "USD per conversation-hour",
                   "inter-turn hit rate", "TTFT p50", "TTFT p99", "idle share", "worker CPU vs naive", "run",
                   "load"):
        table.add_column(header, justify="left" if header == "configuration" else "right")
    for name, r in runs.items():
        table.add_row(name.replace("_", " "), f"${r.usd_per_million_tokens:.4f}",
                      f"{r.usd_per_million_tokens / naive:.3f}x", f"${r.usd_per_conversation_hour:.6f}",
                      f"{r.inter_turn_hit_rate:.1%}", f"{percentile(r.ttft_ms, 0.5):,.0f} ms",
                      f"{percentile(r.ttft_ms, 0.99):,.0f} ms", f"{r.idle_share:.1%}",
                      f"{r.cpu_seconds_per_million_tokens / naive_cpu:.3f}x", f"{r.wall_s:.1f} s",
                      f"{r.load_average:.1f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="naive and all levers only, shorter sessions and answers, fewer perplexity tokens")
    parser.add_argument("--kv-cache-dtype", choices=sorted(set(PERPLEXITY_CONFIGS) - {"fp32"}), default="int8",
                        help="the quantized KV cache's format (default: %(default)s: on CPU it runs at fp32's "
                             "speed, while fp8 has no CPU kernels and costs more than fp32)")
    parser.add_argument("--seed", type=int, default=18, help="the workload's seed (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each configuration, the order reversed every other round; the median "
                             "run counts (default: %(default)s)")
    args = parser.parse_args()
    shape, ppl_tokens = (QUICK, PERPLEXITY_TOKENS["quick"]) if args.quick else (FULL, PERPLEXITY_TOKENS["full"])
    every = configurations(args.kv_cache_dtype)
    configs = {name: every[name] for name in (("naive", "all_levers") if args.quick else RUN_ORDER)}

    began = time.perf_counter()
    results = asyncio.run(measure(configs, shape, args.seed, args.rounds))
    models = (PERPLEXITY_CONFIGS["fp32"], PERPLEXITY_CONFIGS[args.kv_cache_dtype])
    ppl = perplexities(models, ppl_tokens)
    f = figures(results, Quality(ppl[models[0]], ppl[models[1]]))
    f |= {"sessions": shape.num_sessions, "seed": args.seed, "kv_cache_dtype": args.kv_cache_dtype,
          "perplexity_tokens": ppl_tokens, "quick": args.quick, "bench_wall_s": round(time.perf_counter() - began, 1)}

    from bench.common import print_results
    Console(width=180).print(ablation_table(results))
    rows = [
        ("workload", f"{f['sessions']} sessions at once over {len(TEAMS)} teams, {f['turns']} turns, "
                     f"{f['prompt_tokens']:,} prompt + {f['completion_tokens']:,} completion tokens "
                     f"(seed {args.seed})"),
        ("all levers vs naive", f"{f['cost_all_levers_vs_naive']:.3f}x the cost per 1M tokens "
                                f"(target <= {TARGET_COST_VS_NAIVE}x); inter-turn hit rate "
                                f"{f['all_levers_inter_turn_hit_rate']:.1%} (target >= {TARGET_HIT_RATE:.0%}); "
                                f"{f['cpu_all_levers_vs_naive']:.3f}x the worker CPU-seconds per 1M tokens"),
        ("where all levers' cost goes", f"first turns {f['all_levers_first_turn_cost_share']:.0%} of the requests' "
                                        f"cost; idle {f['all_levers_idle_share']:.0%} of the whole; "
                                        f"{f['all_levers_cache_hit_rate']:.1%} of all prompt tokens from the cache"),
        *[(f"{lever.replace('_', ' ')} alone vs naive", f"{f[f'cost_{lever}_vs_naive']:.3f}x the cost, "
                                                        f"{f[f'cpu_{lever}_vs_naive']:.3f}x the worker CPU")
          for lever in LEVERS if f"cost_{lever}_vs_naive" in f],
        ("machine", f"{os.cpu_count()} cores, 1-minute load average {f['naive_load_average']:.1f} after naive's run, "
                    f"{f['all_levers_load_average']:.1f} after all levers' (the workers' share of the cores is what "
                    "the cost counts: other tenants' load inflates wall time, not CPU time)"),
        ("quality", f"perplexity {f['perplexity_all_levers']:.3f} (int8 weights, {args.kv_cache_dtype} KV) vs "
                    f"{f['perplexity_naive']:.3f} (fp32), {ppl_tokens:,} tokens: "
                    f"{f['perplexity_all_levers_vs_naive'] - 1:+.1%} (limit +{PERPLEXITY_LIMIT - 1:.0%})"
                    f"{'' if f['quality_within_limit'] else ': OVER THE LIMIT'}"),
        ("books", f"ledger GPU-seconds {f['ledger_vs_metered_gpu_seconds']:.3f}x the workers' meters; all levers' "
                  f"requests per worker {f['all_levers_requests_per_worker']} (sessions stick to a worker)"),
        ("target met", str(f["target_met"])),
        ("benchmark wall time", f"{f['bench_wall_s']:.0f} s"),
    ]
    print_results("cost: the levers together and one by one", rows, f)


if __name__ == "__main__":
    main()
