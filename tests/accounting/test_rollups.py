"""The atomic record script's rollups against a real Redis: reports read from
the hourly rollups equal the same reports recomputed record by record, to
the nano-dollar, and duplicates never count twice."""

from __future__ import annotations

import dataclasses

import pytest

from accounting.capacity import CapacityStore, WorkerInfo
from accounting.ledger import Ledger
from accounting.reports import IDLE_TEAM, usage_report
from fareway.quota import Budgets, month_of

pytestmark = pytest.mark.redis_cluster

HOUR = 3600.0
BASE = 1_793_491_200.0  # 2026-11-01T00:00:00Z, on the hour


def summary(report) -> list[tuple]:  # noqa: ANN001
    return [(group, dataclasses.astuple(totals)) for group, totals in report.rows]


def test_rollup_reports_equal_the_ledger_recomputed_record_by_record(with_redis, random_records) -> None:  # noqa: ANN001
    records = random_records(400)
    groupings = [["team"], ["team", "project", "model"], ["hardware_class", "day"], ["month", "worker"],
                 ["team", "tag:feature"], ["week", "status"], []]

    async def body(client):  # noqa: ANN001, ANN202
        ledger = Ledger(client)
        assert await ledger.record_many(records, now=BASE + 31 * 24 * HOUR) == len(records)
        pairs = []
        for group_by in groupings:
            whole_hours = await usage_report(ledger, group_by, since=BASE, until=BASE + 31 * 24 * HOUR)
            # Off the hour by a millisecond: the same records, read one by one from the ledger.
            one_by_one = await usage_report(ledger, group_by, since=BASE - 0.001, until=BASE + 31 * 24 * HOUR)
            pairs.append((whole_hours, one_by_one))
        part = (await usage_report(ledger, ["team"], since=BASE + 24 * HOUR, until=BASE + 48 * HOUR),
                await usage_report(ledger, ["team"], since=BASE + 24 * HOUR - 0.5, until=BASE + 48 * HOUR - 0.5))
        return pairs, part
    pairs, (day_rollup, day_scan) = with_redis(body)
    for whole_hours, one_by_one in pairs:
        assert summary(whole_hours) == summary(one_by_one)
        assert whole_hours.total.requests == len(records)
        assert whole_hours.total.cost_nusd == sum(r.cost_nusd for r in records)
        assert whole_hours.total.list_nusd == sum(r.list_nusd for r in records)
    in_day = [r for r in records if BASE + 24 * HOUR <= r.ended_at < BASE + 48 * HOUR]
    assert day_rollup.total.requests == len(in_day) > 0
    assert day_rollup.total.gpu_ns == sum(r.gpu_nanoseconds for r in in_day)
    assert day_scan.total.requests == len([r for r in records if BASE + 24 * HOUR - 0.5 <= r.ended_at
                                           < BASE + 48 * HOUR - 0.5])


def test_duplicate_deliveries_count_once_everywhere(with_redis, random_records) -> None:  # noqa: ANN001
    records = random_records(30, seed=3)
    again = [dataclasses.replace(r, completion_tokens=r.completion_tokens + 1) for r in records[:10]]

    async def body(client):  # noqa: ANN001, ANN202
        ledger = Ledger(client)
        first = await ledger.record_many(records)
        duplicates = await ledger.record_many(records[:10] + again)
        single = [await ledger.record(r) for r in records[10:15]]
        report = await usage_report(ledger, ["team"])
        spend = {team: await Budgets(client).spend(team, month_of(BASE)) for team in ("search", "ads", "infra")}
        stored = [r for team in ("search", "ads", "infra") async for r in ledger.records(team)]
        return first, duplicates, single, report, spend, stored
    first, duplicates, single, report, spend, stored = with_redis(body)
    assert (first, duplicates, single) == (30, 0, [False] * 5)
    assert sorted(stored, key=lambda r: r.request_id) == sorted(records, key=lambda r: r.request_id)
    assert report.total.requests == 30 and report.total.completion_tokens == sum(r.completion_tokens for r in records)
    for team, counters in spend.items():
        assert counters.get("team:cost", 0) == sum(r.cost_nusd for r in records if r.team == team)
        assert counters.get("team:list", 0) == sum(r.list_nusd for r in records if r.team == team)


def test_reports_group_by_how_each_worker_metered_its_device_time(with_redis, random_records) -> None:  # noqa: ANN001
    records = random_records(120, seed=5)

    async def body(client):  # noqa: ANN001, ANN202
        ledger, store = Ledger(client), CapacityStore(client)
        await ledger.record_many(records, now=BASE + 31 * 24 * HOUR)
        await store.register(WorkerInfo("w1", "cpu", 1, "smollm2-135m-instruct"))
        await store.register(WorkerInfo("w2", "nvidia-h100", 1, "llama-3.1-8b", "observed"))
        await store.add("w2", BASE, BASE + HOUR, device_ns=3_600_000_000_000, idle_ns=1_000_000_000_000)
        return [await usage_report(ledger, ["metering", "team"], since=since, until=BASE + 31 * 24 * HOUR,
                                   idle=idle) for since, idle in ((BASE, "none"), (BASE - 0.001, "none"),
                                                                  (BASE, "separate"))]
    whole_hours, one_by_one, with_idle = with_redis(body)
    assert summary(whole_hours) == summary(one_by_one)
    by_metering: dict[str, int] = {}
    for (metering, _team), totals in whole_hours.rows:
        by_metering[metering] = by_metering.get(metering, 0) + totals.requests
    assert by_metering == {"engine-steps": sum(r.worker_id == "w1" for r in records),
                           "observed": sum(r.worker_id == "w2" for r in records)}
    idle_rows = {group: totals for group, totals in with_idle.rows if group[1] == IDLE_TEAM}
    assert list(idle_rows) == [("observed", IDLE_TEAM)] and idle_rows[("observed", IDLE_TEAM)].gpu_ns == 1_000_000_000_000
