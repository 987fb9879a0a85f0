"""Fixtures of the accounting suites: realistic random usage records."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook, price_record
from accounting.records import UsageRecord

HOUR = 3600.0
NOVEMBER_2026 = 1_793_491_200.0  # 2026-11-01T00:00:00Z


@pytest.fixture()
def random_records() -> Callable[..., list[UsageRecord]]:
    """make(count, seed) -> priced records over November 2026: three teams, two projects,
    two models, three hardware classes, some tags, some cancelled."""

    def random_records(count: int, seed: int = 7) -> list[UsageRecord]:
        rng = random.Random(seed)
        book = PriceBook.load(DEFAULT_PRICE_BOOK)
        records = []
        for i in range(count):
            prompt = rng.randint(1, 4000)
            ended = NOVEMBER_2026 + rng.uniform(0, 30 * 24 * HOUR)
            tags = {k: v for k, v in (("feature", rng.choice(["faq", "search", "summary"])),
                                      ("env", rng.choice(["prod", "dev"]))) if rng.random() < 0.6}
            record = UsageRecord(
                request_id=f"r{i}", team=rng.choice(["search", "ads", "infra"]), project=rng.choice(["a", "b"]),
                key_id="k", model=rng.choice(["smollm2-135m-instruct", "llama-3.1-8b"]),
                worker_id=rng.choice(["w1", "w2"]), hardware_class=rng.choice(["cpu", "nvidia-h100", "amd-mi300x"]),
                device_count=1, prompt_tokens=prompt, cached_tokens=rng.randint(0, prompt - 1),
                completion_tokens=rng.randint(1, 500), gpu_seconds=rng.uniform(0.001, 30.0), queue_ms=1, ttft_ms=2,
                total_ms=3, status=rng.choice(["OK", "OK", "OK", "CANCELLED"]), finish_reason="stop",
                started_at=ended - 1, ended_at=ended, tags=tags)
            records.append(price_record(book, record))
        return records
    return random_records
