"""Chargeback exports for a billing period (a calendar month, UTC).

One row per team, project, model, hardware class, tag set, charge day and unit price
(prices change only on the hour, so a day has at most a few), plus one row
per worker, day and price for idle device time. Rows are read from the
hourly rollups, sorted, and written with exact decimals, so the same ledger
always exports to the same bytes.

Formats:
- csv / jsonl: our own columns (usage, tokens, GPU-seconds, costs).
- focus: the FinOps FOCUS 1.2 dataset. BilledCost, EffectiveCost,
  ContractedCost and ListCost are the cost to serve (GPU time x the hardware's
  price per device-hour, which is both the list and the contracted price of
  an internal platform), with PricingQuantity in device-hours and the unit
  price per device-hour; the token list price of the same usage is the
  custom column x_TokenListCost. Tags holds the requests' tags and the
  project (under "fareway.project").
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from accounting.capacity import CapacityStore
from accounting.ledger import Ledger
from accounting.pricebook import PriceBook
from accounting.pricebook_store import PriceBookStore
from accounting.reports import idle_cost_nusd
from accounting.rollups import Totals, bucket_start, read_rollups, tags_of
from fareway.errors import InvalidArgument, shown

FORMATS = ("csv", "jsonl", "focus")
PROJECT_TAG = "fareway.project"
IDLE_SUBACCOUNT = "(unallocated)"
_NS_PER_HOUR = Decimal(3600 * 10**9)
_QUANTITY_PLACES = Decimal("1e-15")


@dataclass(frozen=True)
class ExportConfig:
    """Who the chargeback comes from, as FinOps tools expect to see it."""

    provider_name: str = "Fareway"
    """ProviderName, PublisherName and InvoiceIssuerName: the platform team that runs Fareway."""
    billing_account_id: str = "fareway"
    billing_account_name: str = "Fareway inference platform"
    service_name: str = "Fareway LLM inference"


@dataclass(frozen=True)
class Period:
    """A calendar month: [start, end)."""

    name: str
    start: float
    end: float

    @classmethod
    def parse(cls, text: str) -> Period:
        try:
            first = dt.datetime.strptime(text, "%Y-%m").replace(tzinfo=dt.UTC)
        except ValueError:
            raise InvalidArgument(f"period must be a month like 2026-11, got {shown(text)}", field="period") from None
        if not 1970 <= first.year <= 9998:
            raise InvalidArgument(f"period must be a month from 1970-01 to 9998-12, got {shown(text)}", field="period")
        following = (first + dt.timedelta(days=32)).replace(day=1)
        return cls(text, first.timestamp(), following.timestamp())


def period(text: str) -> Period:
    """Period.parse for argparse: a bad month is a usage error."""
    try:
        return Period.parse(text)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(error.message) from None


@dataclass
class ChargeRow:
    day: str
    team: str
    """"" for idle device time."""
    project: str
    model: str
    hardware_class: str
    worker: str
    """Set on idle rows only."""
    usd_per_device_hour: Decimal
    tags: str = ""
    """The requests' tags as canonical JSON ("" for none)."""
    metering: str = "engine-steps"
    """How the workers that served it metered device time: "engine-steps" or "observed"."""
    totals: Totals = field(default_factory=Totals)

    @property
    def is_idle(self) -> bool:
        return not self.team

    @property
    def billed_nusd(self) -> int:
        return self.totals.idle_nusd if self.is_idle else self.totals.cost_nusd

    def sort_key(self) -> tuple:
        return (self.day, self.is_idle, self.team, self.project, self.model, self.hardware_class, self.worker,
                self.usd_per_device_hour, self.tags, self.metering)


def _day(instant: float) -> str:
    return dt.datetime.fromtimestamp(instant, dt.UTC).strftime("%Y-%m-%d")


def _unit_price(book: PriceBook, hardware_class: str, at: float) -> Decimal:
    price = book.hardware_price(hardware_class, at)
    return Decimal(repr(price.usd_per_device_hour)) if price else Decimal(0)


async def charge_rows(ledger: Ledger, period: Period, *, idle: bool = True,
                      teams: Sequence[str] | None = None) -> list[ChargeRow]:
    """The period's rows, in their export order."""
    redis = ledger.redis
    book = await PriceBookStore(redis).ensure()
    rows: dict[tuple, ChargeRow] = {}
    workers = await CapacityStore(redis).workers()
    metering = {w.worker_id: w.metering for w in workers}
    for team in teams if teams is not None else await ledger.teams():
        # Hour buckets: prices change only on the hour, so each has one price per hardware class.
        buckets = await read_rollups(redis, team, period.start, period.end, coarsest="h")
        for name, cells in buckets:
            start = bucket_start(name)
            for group, totals in cells.items():
                project, model, hardware, worker, _status, tags = group
                price = _unit_price(book, hardware, start)
                key = (_day(start), team, project, model, hardware, "", price, tags,
                       metering.get(worker, "engine-steps"))
                rows.setdefault(key, ChargeRow(*key)).totals.add(totals)
    if idle and teams is None:
        for capacity in await CapacityStore(redis).cells(period.start, period.end):
            if not capacity.idle_ns:
                continue
            start = bucket_start(capacity.hour)
            hardware = capacity.worker.hardware_class
            key = (_day(start), "", "", capacity.worker.model, hardware, capacity.worker.worker_id,
                   _unit_price(book, hardware, start), "", capacity.worker.metering)
            totals = rows.setdefault(key, ChargeRow(*key)).totals
            totals.gpu_ns += capacity.idle_ns
            totals.idle_nusd += idle_cost_nusd(book, capacity)
    return sorted(rows.values(), key=ChargeRow.sort_key)


def _usd(nusd: int) -> str:
    return format(Decimal(nusd).scaleb(-9), "f")


def _device_hours(gpu_ns: int) -> str:
    return format((Decimal(gpu_ns) / _NS_PER_HOUR).quantize(_QUANTITY_PLACES), "f")


def _gpu_seconds(gpu_ns: int) -> str:
    return format(Decimal(gpu_ns).scaleb(-9), "f")


PLAIN_COLUMNS = ("charge_day", "team", "project", "model", "hardware_class", "worker", "tags", "requests",
                 "prompt_tokens",
                 "cached_tokens", "completion_tokens", "gpu_seconds", "usd_per_device_hour", "cost_usd", "idle_usd",
                 "list_usd", "metering")


def _plain(row: ChargeRow) -> dict[str, object]:
    t = row.totals
    return {"charge_day": row.day, "team": row.team or IDLE_SUBACCOUNT, "project": row.project, "model": row.model,
            "hardware_class": row.hardware_class, "worker": row.worker, "tags": row.tags, "requests": t.requests,
            "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
            "completion_tokens": t.completion_tokens, "gpu_seconds": _gpu_seconds(t.gpu_ns),
            "usd_per_device_hour": format(row.usd_per_device_hour, "f"), "cost_usd": _usd(t.cost_nusd),
            "idle_usd": _usd(t.idle_nusd), "list_usd": _usd(t.list_nusd), "metering": row.metering}


FOCUS_COLUMNS = (
    # The 21 columns FOCUS 1.2 makes mandatory, in the specification's alphabetical order.
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
    "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd",
    "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity",
    "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
    # Conditional and recommended columns that apply to us.
    "ChargeFrequency", "ConsumedQuantity", "ConsumedUnit", "ContractedUnitPrice", "ListUnitPrice", "ResourceId",
    "ResourceName", "ResourceType", "ServiceSubcategory", "SkuId", "SkuPriceId", "SubAccountId", "SubAccountName",
    "Tags",
    # Ours, after every FOCUS column, with the x_ prefix the specification requires.
    "x_Requests", "x_PromptTokens", "x_CachedTokens", "x_CompletionTokens", "x_GpuSeconds", "x_TokenListCost",
    "x_HardwareClass", "x_Model", "x_Idle", "x_Metering",
)


def _focus_time(instant: float) -> str:
    return dt.datetime.fromtimestamp(instant, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _focus(row: ChargeRow, period: Period, config: ExportConfig) -> dict[str, str | None]:
    t = row.totals
    day_start = dt.datetime.strptime(row.day, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    cost = _usd(row.billed_nusd)
    sku = f"gpu-time/{row.hardware_class}"
    if row.is_idle:
        description = f"Idle device time of worker {row.worker} ({row.hardware_class})"
        resource = (row.worker, row.worker, "Worker")
        account: tuple[str | None, str | None] = (None, None)
        tags = None
    else:
        description = f"GPU time of {t.requests} {row.model} requests on {row.hardware_class}"
        resource = (row.model, row.model, "Model")
        account = (row.team, row.team)
        # Request tags are the user's tag scheme, unprefixed; ours carry the provider's prefix, as FOCUS asks.
        tags = json.dumps({**tags_of(row.tags), PROJECT_TAG: row.project}, sort_keys=True, separators=(",", ":"))
    return {
        "BilledCost": cost, "BillingAccountId": config.billing_account_id,
        "BillingAccountName": config.billing_account_name, "BillingCurrency": "USD",
        "BillingPeriodEnd": _focus_time(period.end), "BillingPeriodStart": _focus_time(period.start),
        "ChargeCategory": "Usage", "ChargeClass": None, "ChargeDescription": description,
        "ChargePeriodEnd": _focus_time((day_start + dt.timedelta(days=1)).timestamp()),
        "ChargePeriodStart": _focus_time(day_start.timestamp()), "ContractedCost": cost, "EffectiveCost": cost,
        "InvoiceIssuerName": config.provider_name, "ListCost": cost, "PricingQuantity": _device_hours(t.gpu_ns),
        "PricingUnit": "Hours", "ProviderName": config.provider_name, "PublisherName": config.provider_name,
        "ServiceCategory": "AI and Machine Learning", "ServiceName": config.service_name,
        "ChargeFrequency": "Usage-Based", "ConsumedQuantity": _gpu_seconds(t.gpu_ns), "ConsumedUnit": "Seconds",
        "ContractedUnitPrice": format(row.usd_per_device_hour, "f"),
        "ListUnitPrice": format(row.usd_per_device_hour, "f"),
        "ResourceId": resource[0], "ResourceName": resource[1], "ResourceType": resource[2],
        "ServiceSubcategory": "Generative AI", "SkuId": sku, "SkuPriceId": f"{sku}@{row.usd_per_device_hour}",
        "SubAccountId": account[0], "SubAccountName": account[1], "Tags": tags,
        "x_Requests": str(t.requests), "x_PromptTokens": str(t.prompt_tokens),
        "x_CachedTokens": str(t.cached_tokens), "x_CompletionTokens": str(t.completion_tokens),
        "x_GpuSeconds": _gpu_seconds(t.gpu_ns), "x_TokenListCost": _usd(t.list_nusd),
        "x_HardwareClass": row.hardware_class, "x_Model": row.model, "x_Idle": "true" if row.is_idle else "false",
        "x_Metering": row.metering,
    }


def render(rows: Sequence[ChargeRow], period: Period, fmt: str, config: ExportConfig | None = None) -> str:
    """The export's text: the same rows always give the same bytes."""
    config = config or ExportConfig()
    out = io.StringIO()
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(_plain(row), sort_keys=True, separators=(",", ":")) + "\n")
        return out.getvalue()
    if fmt not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}, got {shown(fmt)}", field="format")
    columns = PLAIN_COLUMNS if fmt == "csv" else FOCUS_COLUMNS
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = _plain(row) if fmt == "csv" else _focus(row, period, config)
        writer.writerow(["" if values[c] is None else values[c] for c in columns])  # CSV has no null but empty
    return out.getvalue()
