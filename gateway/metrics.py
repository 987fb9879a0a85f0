"""The gateway's OpenTelemetry metrics, named after the GenAI semantic
conventions where they exist and under `fareway.*` otherwise.

Every finished request (its priced usage record) feeds them:
  gen_ai.client.token.usage        histogram {token}, gen_ai.token.type = input | output | cached
  gen_ai.server.request.duration   histogram s
  gen_ai.server.time_to_first_token histogram s
  gen_ai.server.time_per_output_token histogram s
  fareway.requests                 counter, by status
  fareway.tokens                   counter {token}, by kind (prompt, cached, completion)
  fareway.cost                     counter USD (cost to serve), by team
  fareway.gpu_seconds              counter s, by team
and the pool is observed at each collection (load as last published to the registry or polled):
  fareway.workers                  gauge, workers up / down per model
  fareway.worker.up                gauge 1 / 0, per worker
  fareway.worker.sequences         gauge, running and waiting, per worker
  fareway.worker.kv_usage          gauge, share of the KV cache in use, per worker
  fareway.worker.prefix_cache_hit_rate gauge, per worker
  fareway.queue.depth              gauge, requests waiting at the gateway for saturated workers, per tenant
Attributes carry the team, project, model and worker (gen_ai.request.model,
fareway.team, fareway.project, fareway.worker); never a key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from accounting.recorder import UsageRecord

if TYPE_CHECKING:
    from gateway.pool import WorkerEndpoint

_NANO = 1e-9


class GatewayMetrics:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("fareway.gateway")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per request, by gen_ai.token.type")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Time from request to last token")
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to the first generated token")
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", description="Time per output token after the first")
        self.requests = meter.create_counter("fareway.requests", description="Finished requests, by status")
        self.tokens = meter.create_counter("fareway.tokens", unit="{token}", description="Tokens, by kind")
        self.cost = meter.create_counter("fareway.cost", unit="USD", description="Cost to serve, by team")
        self.gpu_seconds = meter.create_counter("fareway.gpu_seconds", unit="s", description="Device time, by team")
        self._meter = meter

    def observe_pool(self, endpoints: Callable[[], Iterable[WorkerEndpoint]]) -> None:
        """Reports the pool's workers at each collection."""
        def attributes(e: WorkerEndpoint) -> dict[str, str]:
            return {"gen_ai.request.model": e.info.model if e.info else "", "fareway.worker": e.name}

        def workers(options: CallbackOptions) -> Iterable[Observation]:
            counts: dict[tuple[str, bool], int] = {}
            for e in endpoints():
                key = (e.info.model if e.info else "", e.is_up)
                counts[key] = counts.get(key, 0) + 1
            return [Observation(n, {"gen_ai.request.model": model, "fareway.worker.state": "up" if up else "down"})
                    for (model, up), n in counts.items()]

        def up(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(int(e.is_up), attributes(e)) for e in endpoints()]

        def sequences(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, {**attributes(e), "fareway.sequence.state": state}) for e in endpoints()
                    for state, n in (("running", e.load.num_running), ("waiting", e.load.num_waiting))]

        def kv_usage(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(1.0 - e.load.kv_tokens_free / e.info.kv_capacity_tokens, attributes(e))
                    for e in endpoints() if e.info and e.info.kv_capacity_tokens and e.is_up]

        def hit_rate(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(e.load.prefix_cache_hit_rate, attributes(e)) for e in endpoints() if e.is_up]

        for name, callback, description in (
                ("fareway.workers", workers, "Workers known to the gateway, up or down, per model"),
                ("fareway.worker.up", up, "1 while the worker can be reached"),
                ("fareway.worker.sequences", sequences, "Sequences running and waiting on the worker"),
                ("fareway.worker.kv_usage", kv_usage, "Share of the worker's KV cache in use"),
                ("fareway.worker.prefix_cache_hit_rate", hit_rate, "Prompt tokens served from the prefix cache")):
            self._meter.create_observable_gauge(name, callbacks=[callback], description=description)

    def observe_queues(self, depths: Callable[[], Iterable[tuple[str, tuple[str, str], int]]]) -> None:
        """Reports (model, (team, project), requests waiting) as fareway.queue.depth at each collection."""
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, {"gen_ai.request.model": model, "fareway.team": team, "fareway.project": project})
                    for model, (team, project), n in depths()]
        self._meter.create_observable_gauge("fareway.queue.depth", callbacks=[observe],
                                            description="Requests waiting at the gateway for a worker, per tenant")

    def finished(self, record: UsageRecord) -> None:
        base = {"gen_ai.request.model": record.model, "fareway.team": record.team,
                "fareway.project": record.project}
        self.requests.add(1, {**base, "fareway.status": record.status, "fareway.worker": record.worker_id})
        for kind, count in (("input", record.prompt_tokens), ("output", record.completion_tokens),
                            ("cached", record.cached_tokens)):
            self.token_usage.record(count, {**base, "gen_ai.token.type": kind})
        for kind, count in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens),
                            ("cached", record.cached_tokens)):
            self.tokens.add(count, {**base, "fareway.token.kind": kind})
        self.cost.add(record.cost_nusd * _NANO, base)
        self.gpu_seconds.add(record.gpu_seconds, base)
        if record.status != "OK":
            return
        self.duration.record(record.total_ms / 1000.0, base)
        if record.ttft_ms:
            self.ttft.record(record.ttft_ms / 1000.0, base)
        if record.completion_tokens > 1:
            self.tpot.record((record.total_ms - record.ttft_ms) / 1000.0 / (record.completion_tokens - 1), base)
