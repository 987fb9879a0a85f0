"""Idle capacity: a worker reports its metered device time, reports price the
idle part, and the books balance: requests' cost + idle cost = device-hours x
price, per worker and period; shared idle adds up to the idle total."""

from __future__ import annotations

import asyncio
import time

import pytest

from accounting.capacity import CapacityStore, WorkerInfo, split_by_hour
from accounting.ledger import Ledger
from accounting.pricebook import price_record
from accounting.pricebook_store import PriceBookStore
from accounting.records import UsageRecord
from accounting.reports import IDLE_TEAM, idle_cost_nusd, usage_report
from workers.capacity_reporter import CapacityReporter
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.sequence import SamplingOptions
from workers.worker import Worker

CENT_NUSD = 10_000_000


def test_a_sample_split_over_hours_adds_up_exactly() -> None:
    start = 1_793_491_200.0 + 3000  # 10 minutes before an hour ends
    parts = split_by_hour(start, start + 2 * 3600, device_ns=7_200_000_000_001, idle_ns=3_600_000_000_003)
    assert [p[0][-2:] for p in parts] == ["00", "01", "02"]
    assert sum(p[1] for p in parts) == 7_200_000_000_001 and sum(p[2] for p in parts) == 3_600_000_000_003
    assert parts[0][1] == pytest.approx(7.2e12 * 600 / 7200, rel=1e-9)
    assert all(idle <= device for _, device, idle in parts)


def test_requests_plus_idle_cost_equal_device_hours_times_price(tiny_checkpoint, with_redis) -> None:  # noqa: ANN001
    worker = Worker(WorkerConfig(worker_id="capacity-worker",
                                 runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20)), tiny_checkpoint)

    async def body(client):  # noqa: ANN001, ANN202
        book = await PriceBookStore(client).ensure()
        ledger, store = Ledger(client), CapacityStore(client)
        reporter = CapacityReporter(worker, store, interval_s=0.2)
        worker.start()
        await reporter.start()
        await asyncio.sleep(0.3)  # idle
        for team, text in (("search", "The first request"), ("ads", "Another one, a little longer than that")):
            ids = worker.tokenizer.encode(text)
            async for output in worker.async_engine.generate(ids, SamplingOptions(12, temperature=0)):
                pass
            now = time.time()
            usage = output.usage
            await ledger.record(price_record(book, UsageRecord(
                request_id=output.request_id, team=team, project="p", key_id="k", model="tiny", worker_id=worker.worker_id,
                hardware_class=worker.runner.hardware.hardware_class, device_count=1,
                prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                completion_tokens=usage.completion_tokens, gpu_seconds=usage.gpu_seconds, queue_ms=0, ttft_ms=0,
                total_ms=0, status="OK", finish_reason="length", started_at=now, ended_at=now)))
            await asyncio.sleep(0.25)  # idle between requests
        worker.stop()
        await reporter.stop()
        cells = await store.cells()
        return (book, cells, await usage_report(ledger, ["team"], idle="separate"),
                await usage_report(ledger, ["team"], idle="share"))
    book, cells, separate, shared = with_redis(body)

    assert cells and all(c.worker.worker_id == "capacity-worker" for c in cells)
    price = book.hardware_price("cpu", time.time())
    device_cost = sum(price.cost_nusd(c.device_ns / 1e9) for c in cells)
    idle_cost = sum(idle_cost_nusd(book, c) for c in cells)
    requests_cost = separate.total.cost_nusd
    assert idle_cost > 0 and requests_cost > 0
    assert abs(requests_cost + idle_cost - device_cost) < CENT_NUSD
    # The meter's split and the records agree on the attributed time too.
    assert sum(c.attributed_ns for c in cells) == pytest.approx(separate.total.gpu_ns - sum(c.idle_ns for c in cells),
                                                                rel=1e-6)

    rows = dict(separate.rows)
    assert rows[(IDLE_TEAM,)].idle_nusd == idle_cost and rows[(IDLE_TEAM,)].requests == 0
    assert separate.total.cost_nusd + separate.total.idle_nusd == requests_cost + idle_cost
    # Shared: no idle row, each team carries a part, and the parts add up to the idle total exactly.
    assert [g for g, _ in shared.rows] == [("ads",), ("search",)]
    assert sum(t.idle_nusd for _, t in shared.rows) == idle_cost == shared.total.idle_nusd
    assert all(t.idle_nusd > 0 for _, t in shared.rows)


def test_cost_per_million_tokens_counts_the_idle_cost_where_the_row_carries_it(with_redis) -> None:  # noqa: ANN001
    """A team's row: its requests' cost over its tokens; shared idle adds its share; the total carries
    the idle cost either way; an idle row has no tokens, so no figure."""
    ended = time.time()

    def usage(request_id: str, team: str, prompt: int, completion: int, gpu_seconds: float) -> UsageRecord:
        return UsageRecord(
            request_id=request_id, team=team, project="p", key_id="k", model="smollm2-135m-instruct",
            worker_id="per-million-worker", hardware_class="cpu", device_count=1, prompt_tokens=prompt,
            cached_tokens=prompt // 2, completion_tokens=completion, gpu_seconds=gpu_seconds, queue_ms=0, ttft_ms=0,
            total_ms=0, status="OK", finish_reason="length", started_at=ended - 1, ended_at=ended)

    async def body(client):  # noqa: ANN001, ANN202
        book = await PriceBookStore(client).ensure()
        ledger, store = Ledger(client), CapacityStore(client)
        await ledger.record(price_record(book, usage("a", "search", 900, 100, 2.0)))
        await ledger.record(price_record(book, usage("b", "ads", 300, 200, 1.0)))
        await store.register(WorkerInfo("per-million-worker", "cpu", 1, "smollm2-135m-instruct"))
        await store.add("per-million-worker", ended - 10, ended, device_ns=10 * 10**9, idle_ns=7 * 10**9)
        return (book, await usage_report(ledger, ["team"], idle="separate"),
                await usage_report(ledger, ["team"], idle="share"))
    book, separate, shared = with_redis(body)

    price = book.hardware_price("cpu", ended)
    idle_nusd = price.cost_nusd(7.0)
    rows = dict(separate.rows)
    assert rows[("search",)].usd_per_million_tokens == pytest.approx(price.cost_nusd(2.0) / 1e3 / 1000)
    assert rows[("ads",)].usd_per_million_tokens == pytest.approx(price.cost_nusd(1.0) / 1e3 / 500)
    assert rows[(IDLE_TEAM,)].usd_per_million_tokens is None
    everything = price.cost_nusd(2.0) + price.cost_nusd(1.0) + idle_nusd
    assert separate.total.usd_per_million_tokens == pytest.approx(everything / 1e3 / 1500)
    assert shared.total.usd_per_million_tokens == pytest.approx(everything / 1e3 / 1500)
    search = dict(shared.rows)[("search",)]
    assert search.usd_per_million_tokens == pytest.approx((search.cost_nusd + search.idle_nusd) / 1e3 / 1000)
    assert search.idle_nusd > 0
