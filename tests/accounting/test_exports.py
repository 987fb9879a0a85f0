"""Chargeback exports and reconciliation against a real Redis: the FOCUS 1.2
columns and rules, totals that equal the report, identical bytes on
re-export, and a reconciliation that passes on honest data and catches
tampering."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from decimal import Decimal

import pytest

from accounting.capacity import CapacityStore, WorkerInfo
from accounting.exports import FOCUS_COLUMNS, Period, charge_rows, render
from accounting.ledger import Ledger
from accounting.reconcile import reconcile
from accounting.reports import usage_report
from fareway.redis import keys

NOVEMBER = Period.parse("2026-11")
# FOCUS 1.2's mandatory columns, as the specification names them.
MANDATORY = {"BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
             "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd",
             "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost",
             "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName"}
TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def load(with_redis, records, idle_ns: int = 0):  # noqa: ANN001, ANN201
    """Records the usage (and one worker's idle time), then returns (rows, report, reconciliation, ledger texts)."""
    async def body(client):  # noqa: ANN001, ANN202
        ledger = Ledger(client)
        await ledger.record_many(records)
        if idle_ns:
            store = CapacityStore(client)
            await store.register(WorkerInfo("w1", "nvidia-h100", 1, "llama-3.1-8b"))
            await store.add("w1", NOVEMBER.start + 3600, NOVEMBER.start + 7200, 3_600_000_000_000, idle_ns)
        rows = await charge_rows(ledger, NOVEMBER)
        again = await charge_rows(ledger, NOVEMBER)
        report = await usage_report(ledger, ["team"], since=NOVEMBER.start, until=NOVEMBER.end, idle="separate")
        return rows, again, report, await reconcile(ledger, NOVEMBER)
    return with_redis(body)


def test_the_focus_export_follows_the_specification(with_redis, random_records) -> None:  # noqa: ANN001
    rows, _, report, _ = load(with_redis, random_records(300), idle_ns=1_800_000_000_000)
    text = render(rows, NOVEMBER, "focus")
    table = list(csv.DictReader(io.StringIO(text)))
    header = next(csv.reader(io.StringIO(text)))

    assert MANDATORY <= set(header)
    custom = [c for c in header if c not in FOCUS_COLUMNS[: header.index("x_Requests")]]
    assert custom and all(c.startswith("x_") for c in custom)
    assert header.index("x_Requests") > max(header.index(c) for c in MANDATORY)  # ours after theirs
    total_billed = Decimal(0)
    for row in table:
        assert all(row[c] != "" for c in MANDATORY - {"ChargeClass"}), row
        assert row["ChargeClass"] == "" and row["ChargeCategory"] == "Usage"
        assert row["ServiceCategory"] == "AI and Machine Learning" and row["ServiceSubcategory"] == "Generative AI"
        for column in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd"):
            assert TIME.match(row[column]), (column, row[column])
        assert (row["BillingPeriodStart"], row["BillingPeriodEnd"]) == ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
        # A charge period is one day: start inclusive, end exclusive, the next day's start.
        start, end = row["ChargePeriodStart"], row["ChargePeriodEnd"]
        assert start.endswith("T00:00:00Z") and end.endswith("T00:00:00Z") and start < end
        for column in ("BilledCost", "ListCost", "PricingQuantity", "ListUnitPrice", "ConsumedQuantity"):
            assert NUMBER.match(row[column]), (column, row[column])
        # ConsumedQuantity is set because every row is Usage (FOCUS: null unless Usage).
        assert row["ConsumedUnit"] == "Seconds" and row["PricingUnit"] == "Hours"
        # PricingQuantity x unit price = the cost columns, to the cent.
        for price, cost in (("ListUnitPrice", "ListCost"), ("ContractedUnitPrice", "ContractedCost")):
            assert abs(Decimal(row["PricingQuantity"]) * Decimal(row[price]) - Decimal(row[cost])) < Decimal("0.005")
        assert row["BilledCost"] == row["EffectiveCost"] == row["ContractedCost"]
        if row["x_Idle"] == "true":
            assert row["SubAccountId"] == "" and row["ResourceType"] == "Worker" and row["Tags"] == ""
        else:
            tags = json.loads(row["Tags"])
            assert row["SubAccountId"] and tags["fareway.project"] in ("a", "b")
            assert set(tags) - {"fareway.project"} <= {"feature", "env"}
        total_billed += Decimal(row["BilledCost"])
    # BilledCost adds up to the report's cost to serve plus its idle cost.
    assert total_billed == report.total.cost_usd + report.total.idle_usd
    assert any(row["x_Idle"] == "true" for row in table)


def test_re_exports_are_identical_bytes_in_every_format(with_redis, random_records) -> None:  # noqa: ANN001
    rows, again, _, _ = load(with_redis, random_records(200, seed=11))
    for fmt in ("csv", "jsonl", "focus"):
        assert render(rows, NOVEMBER, fmt) == render(again, NOVEMBER, fmt)
    lines = render(rows, NOVEMBER, "jsonl").splitlines()
    assert len(lines) == len(rows) and json.loads(lines[0])["charge_day"].startswith("2026-11-")
    keys = [(r.day, r.team, r.project, r.model, r.hardware_class) for r in rows]
    assert keys == sorted(keys), "rows come in a fixed order"


def test_reconcile_passes_on_honest_data_and_after_duplicate_deliveries(with_redis, random_records) -> None:  # noqa: ANN001
    records = random_records(250, seed=5)
    _, _, _, result = load(with_redis, records + records[:40])
    assert result.ok and result.records == 250
    assert {c.team for c in result.teams} == {"search", "ads", "infra"}
    assert sum(c.ledger.cost_nusd for c in result.teams) == sum(r.cost_nusd for r in records)


@pytest.mark.parametrize("tamper", ["rollup", "price"])
def test_reconcile_catches_a_figure_that_does_not_add_up(with_redis, random_records, tamper: str) -> None:  # noqa: ANN001
    records = random_records(50, seed=9)

    async def body(client):  # noqa: ANN001, ANN202
        ledger = Ledger(client)
        await ledger.record_many(records)
        victim = records[0]
        if tamper == "rollup":
            key = keys.rollup(victim.team, "m", "2026-11")
            field = next(f for f in await client.hkeys(key) if f.endswith("cost_nusd"))
            await client.hincrby(key, field, 1)
        else:
            await ledger.record(dataclasses.replace(victim, request_id="overcharged", cost_nusd=victim.cost_nusd + 10))
        return await reconcile(ledger, NOVEMBER)
    result = with_redis(body)
    assert not result.ok
    if tamper == "rollup":
        assert [c.team for c in result.teams if not c.ok] == [records[0].team]
    else:
        assert result.repriced_mismatches == ["overcharged"]


def test_rows_say_how_their_workers_metered_device_time(with_redis, random_records) -> None:  # noqa: ANN001
    records = random_records(200, seed=11)   # from workers w1 and w2

    async def body(client):  # noqa: ANN001, ANN202
        ledger = Ledger(client)
        await ledger.record_many(records)
        await CapacityStore(client).register(WorkerInfo("w2", "nvidia-h100", 1, "llama-3.1-8b", "observed"))
        return await charge_rows(ledger, NOVEMBER)
    rows = with_redis(body)
    table = list(csv.DictReader(io.StringIO(render(rows, NOVEMBER, "focus"))))
    by_metering = {m: sum(int(r["x_Requests"]) for r in table if r["x_Metering"] == m)
                   for m in ("observed", "engine-steps")}
    assert by_metering == {"observed": sum(r.worker_id == "w2" for r in records),
                           "engine-steps": sum(r.worker_id == "w1" for r in records)}
    plain = list(csv.DictReader(io.StringIO(render(rows, NOVEMBER, "csv"))))
    assert {r["metering"] for r in plain} == {"observed", "engine-steps"}
