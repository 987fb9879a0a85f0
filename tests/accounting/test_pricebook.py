"""The price book: prices by effective date, the two costs of a record, and
versions in Redis that never reprice the past."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook, price_record
from accounting.pricebook_store import PRICE_CHANGE_NOTICE_S, PriceBookError, PriceBookStore
from accounting.records import UsageRecord

NOV_1 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()
NOV_15 = dt.datetime(2026, 11, 15, tzinfo=dt.UTC).timestamp()

BOOK = """
version = "v1"
[[hardware]]
class = "nvidia-h100"
usd_per_device_hour = 2.50
effective_from = 2026-01-01
[[hardware]]
class = "nvidia-h100"
usd_per_device_hour = 2.00
effective_from = 2026-11-15T00:00:00Z
[[hardware]]
class = "*"
usd_per_device_hour = 1.00
effective_from = 2026-01-01
[[model]]
name = "llama-3.1-8b"
usd_per_million_prompt_tokens = 0.20
usd_per_million_cached_prompt_tokens = 0.05
usd_per_million_completion_tokens = 0.60
effective_from = 2026-01-01
"""


def usage(**changes) -> UsageRecord:  # noqa: ANN003
    base = UsageRecord(
        request_id="r", team="search", project="ranking", key_id="k", model="llama-3.1-8b", worker_id="w",
        hardware_class="nvidia-h100", device_count=2, prompt_tokens=1_000_000, cached_tokens=400_000,
        completion_tokens=100_000, gpu_seconds=7200.0, queue_ms=0, ttft_ms=0, total_ms=0, status="OK",
        finish_reason="stop", started_at=NOV_1, ended_at=NOV_1 + 10)
    return dataclasses.replace(base, **changes)


def test_costs_are_the_hand_calculations() -> None:
    priced = price_record(PriceBook.from_toml(BOOK), usage())
    # 7,200 GPU-seconds (two devices for an hour) at $2.50 per device-hour.
    assert priced.cost_nusd == 5_000_000_000
    # 600k prompt tokens at $0.20/M, 400k cached at $0.05/M, 100k completion at $0.60/M.
    assert priced.list_nusd == 120_000_000 + 20_000_000 + 60_000_000
    assert priced.price_version == "v1"


def test_cached_prompt_tokens_are_never_billed_at_the_full_input_rate() -> None:
    book = PriceBook.from_toml(BOOK)
    all_cached = price_record(book, usage(cached_tokens=1_000_000, completion_tokens=0))
    none_cached = price_record(book, usage(cached_tokens=0, completion_tokens=0))
    assert all_cached.list_nusd * 4 == none_cached.list_nusd


def test_a_price_change_mid_period_prices_each_record_by_its_time() -> None:
    book = PriceBook.from_toml(BOOK)
    before = price_record(book, usage(ended_at=NOV_15 - 1))
    after = price_record(book, usage(ended_at=NOV_15))
    assert (before.cost_nusd, after.cost_nusd) == (5_000_000_000, 4_000_000_000)


def test_unknown_hardware_and_models_take_the_catch_all_prices() -> None:
    book = PriceBook.from_toml(BOOK)
    priced = price_record(book, usage(hardware_class="amd-mi300x", model="mystery"))
    assert priced.cost_nusd == 2_000_000_000 and priced.list_nusd == 0


@pytest.mark.parametrize(("text", "message"), [
    ("version = 1\n[[hardware]]\nclass = 'x'\nusd_per_device_hour = -1\neffective_from = 2026-01-01", ">= 0"),
    ("[[hardware]]\nclass = 'x'", "missing"),
    ("version = 'v'\n[[model]]\nname = 'm'\nusd_per_million_prompt_tokens = 1\n"
     "usd_per_million_cached_prompt_tokens = 1\nusd_per_million_completion_tokens = 1\neffective_from = 'soon'",
     "date"),
    ("version = 'v'\n[[hardware]]\nclass = 'x'\nusd_per_device_hour = 1\neffective_from = 2026-01-01\n"
     "[[hardware]]\nclass = 'x'\nusd_per_device_hour = 2\neffective_from = 2026-01-01", "same instant"),
    ("not toml at all [", "not a valid price book"),
    ("version = 'v'\n[[hardware]]\nclass = 'x'\nusd_per_device_hour = 1\neffective_from = 2026-01-01T09:30:00Z",
     "on the hour"),
])
def test_bad_price_books_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriceBook.from_toml(text)


def test_the_default_price_book_prices_every_hardware_class_we_detect() -> None:
    book = PriceBook.load(DEFAULT_PRICE_BOOK)
    for hardware in ("cpu", "nvidia-h100", "nvidia-h200", "nvidia-a100", "nvidia-l4", "amd-mi300x"):
        assert book.hardware_price(hardware, NOV_1) is not None, hardware
    assert PriceBook.from_json(book.to_json()) == book


def test_loaded_versions_never_reprice_the_past(with_redis) -> None:  # noqa: ANN001
    v1 = PriceBook.from_toml(BOOK)
    now = NOV_15 + 86400
    raise_h100 = BOOK.replace('version = "v1"', 'version = "v2"').replace("2.00", "2.20")
    later = BOOK.replace('version = "v1"', 'version = "v2"') + (
        '[[hardware]]\nclass = "nvidia-h100"\nusd_per_device_hour = 2.20\neffective_from = 2026-12-01\n')

    async def body(client):  # noqa: ANN001, ANN202
        store = PriceBookStore(client)
        await store.load(v1, now=now)
        refusals = []
        for text in (raise_h100, BOOK.replace("2.00", "9.99")):
            try:
                await store.load(PriceBook.from_toml(text), now=now)
            except PriceBookError as error:
                refusals.append(str(error))
        # A new price from next month on is fine: it adds to the history, it does not change it.
        await store.load(PriceBook.from_toml(later), now=now)
        return refusals, (await store.current()).version, await store.versions()
    refusals, current, versions = with_redis(body)
    assert "changes prices in force before" in refusals[0]
    assert "already loaded with other prices" in refusals[1]
    assert current == "v2" and versions == ["v1", "v2"]


def test_a_new_price_needs_notice(with_redis) -> None:  # noqa: ANN001
    soon = dt.datetime.fromtimestamp(NOV_1 + 3600, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    now = NOV_1 + 3600 - PRICE_CHANGE_NOTICE_S / 2
    text = BOOK.replace('version = "v1"', 'version = "v2"') + (
        f'[[hardware]]\nclass = "cpu"\nusd_per_device_hour = 0.5\neffective_from = {soon}\n')

    async def body(client):  # noqa: ANN001, ANN202
        store = PriceBookStore(client)
        await store.load(PriceBook.from_toml(BOOK), now=now)
        with pytest.raises(PriceBookError):
            await store.load(PriceBook.from_toml(text), now=now)
    with_redis(body)
