"""Budgets against a real Redis: reservations make a hard budget hold under a
burst of concurrent requests, spend moves with each usage record, and a
soft threshold only records an alert."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest

from accounting.ledger import Ledger
from accounting.records import UsageRecord
from fareway.quota import Budget, BudgetRefused, Budgets, month_of

pytestmark = pytest.mark.redis_cluster

NOW = time.time()


def settled(request_id: str, project: str, list_nusd: int, cost_nusd: int, reservation_month: str) -> UsageRecord:
    return UsageRecord(
        request_id=request_id, team="search", project=project, key_id="k", model="m", worker_id="w",
        hardware_class="cpu", device_count=1, prompt_tokens=10, cached_tokens=0, completion_tokens=10,
        gpu_seconds=0.1, queue_ms=0, ttft_ms=0, total_ms=0, status="OK", finish_reason="stop",
        started_at=NOW, ended_at=NOW, cost_nusd=cost_nusd, list_nusd=list_nusd, price_version="t",
        budget_period=reservation_month)


def test_a_burst_cannot_overshoot_a_nearly_spent_hard_budget(with_redis) -> None:  # noqa: ANN001
    """50 requests at once, each able to cost up to $0.10, against $1.00 of which $0.75 is spent:
    at most two are admitted at a time (their reservations fit), and spend ends within the limit."""
    rng = random.Random(5)

    async def body(client):  # noqa: ANN001, ANN202
        budgets, ledger = Budgets(client), Ledger(client)
        await budgets.set(Budget("search", hard_usd=1.00, basis="list"))
        await ledger.record(settled("earlier", "ranking", 750_000_000, 0, ""))

        async def one(i: int) -> str:
            try:
                reservation = await budgets.reserve("search", "ranking", f"r{i}", max_cost_nusd=0,
                                                    max_list_nusd=100_000_000)
            except BudgetRefused:
                return "refused"
            await asyncio.sleep(rng.uniform(0, 0.02))  # the request runs
            actual = rng.randint(1, 100_000_000)  # never more than its reservation (list basis)
            await ledger.record(settled(f"r{i}", "ranking", actual, 0, reservation.month))
            return "ran"
        outcomes = await asyncio.gather(*(one(i) for i in range(50)))
        return outcomes, await budgets.spend("search", month_of(NOW))
    outcomes, spend = with_redis(body)
    assert 2 <= outcomes.count("ran") < 50
    assert spend["team:list"] <= 1_000_000_000
    assert spend.get("team:reserved_list", 0) == 0  # every reservation was settled


def test_a_refusal_names_the_budget_and_nothing_is_held(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        budgets = Budgets(client)
        await budgets.set(Budget("search", project="ranking", hard_usd=0.05, soft_usd=0.01, basis="list"))
        with pytest.raises(BudgetRefused) as refused:
            await budgets.reserve("search", "ranking", "big", max_cost_nusd=0, max_list_nusd=60_000_000)
        other_project = await budgets.reserve("search", "ads", "x", max_cost_nusd=0, max_list_nusd=60_000_000)
        return refused.value.refusal, other_project, await budgets.spend("search", month_of(NOW))
    refusal, other_project, spend = with_redis(body)
    assert (refusal.scope, refusal.hard_nusd, refusal.basis) == ("project:ranking", 50_000_000, "list")
    assert other_project.month == ""  # no budget covers project ads: nothing is reserved
    assert spend == {}


def test_released_reservations_return_what_they_held(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        budgets = Budgets(client)
        await budgets.set(Budget("search", hard_usd=10, basis="cost"))
        held = await budgets.reserve("search", "ranking", "a", max_cost_nusd=5_000, max_list_nusd=7_000)
        during = await budgets.spend("search", held.month)
        assert await budgets.release("search", held)
        assert not await budgets.release("search", held)  # a second release is a no-op
        return during, await budgets.spend("search", held.month)
    during, after = with_redis(body)
    assert during == {"team:reserved_cost": 5_000, "team:reserved_list": 7_000,
                      "project:ranking:reserved_cost": 5_000, "project:ranking:reserved_list": 7_000}
    assert set(after.values()) == {0}


def test_crossing_a_soft_threshold_records_one_alert(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        budgets, ledger = Budgets(client), Ledger(client)
        await budgets.set(Budget("search", soft_usd=0.001, basis="cost"))
        for i in range(3):
            held = await budgets.reserve("search", "ranking", f"r{i}", max_cost_nusd=1, max_list_nusd=1)
            await ledger.record(settled(f"r{i}", "ranking", 0, 900_000, held.month))
        return await budgets.alerts("search"), await budgets.list("search")
    alerts, listed = with_redis(body)
    assert len(alerts) == 1 and alerts[0]["scope"] == "team" and int(alerts[0]["spent_nusd"]) >= 1_000_000
    assert listed == [Budget("search", soft_usd=0.001, basis="cost")]


def test_budgets_are_validated() -> None:
    with pytest.raises(ValueError, match="basis"):
        Budget("search", hard_usd=1, basis="vibes")
    with pytest.raises(ValueError, match="hard limit, a soft threshold or both"):
        Budget("search")
    with pytest.raises(ValueError, match="from 0 to"):
        Budget("search", hard_usd=-1)
    assert Budget.decode("t", "project:p", Budget("t", "p", 2.5, None, "cost").encode()) == \
        dataclasses.replace(Budget("t", "p", 2.5, None, "cost"))


def test_reservations_of_a_dead_gateway_are_released_after_their_max_age(with_redis) -> None:  # noqa: ANN001
    async def body(client):  # noqa: ANN001, ANN202
        budgets = Budgets(client)
        await budgets.set(Budget("search", hard_usd=1, basis="list"))
        old = await budgets.reserve("search", "ranking", "orphan", max_cost_nusd=0, max_list_nusd=900_000_000,
                                    now=NOW - 7200)
        await budgets.reserve("search", "ranking", "running", max_cost_nusd=0, max_list_nusd=50_000_000, now=NOW)
        released = await budgets.release_stale("search", max_age_s=3600, now=NOW)
        return released, old.month, await budgets.spend("search", old.month), await budgets.spend("search", month_of(NOW))
    released, orphan_month, orphan_spend, this_month = with_redis(body)
    assert released == 1
    assert this_month["team:reserved_list"] == 50_000_000  # the running request still holds its part
    # The orphan's month (this one, or the last if the test runs just after midnight on the 1st) holds nothing more.
    assert orphan_spend["team:reserved_list"] == (50_000_000 if orphan_month == month_of(NOW) else 0)
