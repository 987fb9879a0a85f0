"""The usage ledger and reports against a real Redis."""

from __future__ import annotations

import dataclasses

import pytest

from accounting.ledger import Ledger
from accounting.records import UsageRecord
from accounting.reports import usage_report
from fareway.errors import InvalidArgument

pytestmark = pytest.mark.redis_cluster

DAY = 86400.0
BASE = 1_790_000_000.0  # 2026-09-21, a fixed day for "day" grouping


def record(request_id: str, **changes) -> UsageRecord:  # noqa: ANN003
    base = UsageRecord(
        request_id=request_id, team="search", project="ranking", key_id="k1", model="smollm2",
        worker_id="w1", hardware_class="cpu", device_count=1, prompt_tokens=10, cached_tokens=2,
        completion_tokens=5, gpu_seconds=0.5, queue_ms=1.0, ttft_ms=20.0, total_ms=100.0, status="OK",
        finish_reason="stop", started_at=BASE, ended_at=BASE + 1, tags={"feature": "summary"})
    return dataclasses.replace(base, **changes)


@pytest.fixture()
def with_ledger(with_redis):  # noqa: ANN001, ANN201
    return lambda body: with_redis(lambda client: body(Ledger(client)))


def test_a_request_recorded_twice_stays_one_record(with_ledger) -> None:  # noqa: ANN001
    async def body(ledger: Ledger):  # noqa: ANN202
        first = await ledger.record(record("r1"))
        again = await ledger.record(record("r1", completion_tokens=99))
        stored = await ledger.get("search", "ranking", "r1")
        return first, again, [r async for r in ledger.records("search")], stored
    first, again, records, stored = with_ledger(body)
    assert (first, again) == (True, False)
    assert records == [record("r1")] and stored == record("r1")


def test_the_same_request_id_in_two_projects_is_two_requests(with_ledger) -> None:  # noqa: ANN001
    async def body(ledger: Ledger):  # noqa: ANN202
        return [await ledger.record(record("r1")), await ledger.record(record("r1", project="ads"))]
    assert with_ledger(body) == [True, True]


def test_report_groups_and_totals(with_ledger) -> None:  # noqa: ANN001
    async def body(ledger: Ledger):  # noqa: ANN202
        await ledger.record(record("a"))
        await ledger.record(record("b", project="ads", tags={}))
        await ledger.record(record("c", team="infra", ended_at=BASE + DAY + 5))
        return (await usage_report(ledger, ["team", "project"]),
                await usage_report(ledger, ["day", "tag:feature"], teams=["search"]),
                await usage_report(ledger, ["team"], since=BASE + DAY))
    by_project, by_day, recent = with_ledger(body)
    assert [(g, t.requests, t.prompt_tokens) for g, t in by_project.rows] == [
        (("infra", "ranking"), 1, 10), (("search", "ads"), 1, 10), (("search", "ranking"), 1, 10)]
    assert by_project.total.requests == 3 and by_project.total.gpu_seconds == pytest.approx(1.5)
    assert [g for g, _ in by_day.rows] == [("2026-09-21", ""), ("2026-09-21", "summary")]
    assert [(g, t.requests) for g, t in recent.rows] == [(("infra",), 1)]


def test_unknown_dimension_is_invalid_argument(with_ledger) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgument, match="cannot group by 'colour'"):
        with_ledger(lambda ledger: usage_report(ledger, ["colour"]))


def test_records_round_trip_through_stream_fields() -> None:
    r = record("x", tags={"a": "1", "b": "é"})
    assert UsageRecord.from_fields(r.to_fields()) == r
