"""Accounting at scale, against a real redis-server started for the run:

1. Usage records ingested per second by one process through the atomic
   record script (dedupe + ledger + rollups + spend; batches of 1,000, one
   script call per team, two batches in flight), vs the same records
   appended with plain pipelined XADD of their JSON (a ledger with no
   deduplication, rollups or budgets: the floor of a Redis write).
2. A month's report over 1M records (group by team, project, model) read from
   the rollups, vs the same report recomputed from the raw ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from accounting.exports import Period
from accounting.ledger import Ledger
from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook, price_record
from accounting.records import UsageRecord
from accounting.reports import usage_report
from bench.common import print_results
from fareway.net import free_port
from fareway.redis import connect, keys
from fareway.redis.embedded import EmbeddedRedis

MONTH = Period.parse("2026-11")
BATCH = 1000


def records(count: int, seed: int, prefix: str) -> list[UsageRecord]:
    rng = random.Random(seed)
    book = PriceBook.load(DEFAULT_PRICE_BOOK)
    out = []
    for i in range(count):
        prompt = rng.randint(10, 3000)
        ended = MONTH.start + rng.uniform(0, MONTH.end - MONTH.start - 1)
        out.append(price_record(book, UsageRecord(
            request_id=f"{prefix}{i}", team=f"team-{rng.randrange(20)}", project=f"p{rng.randrange(5)}",
            key_id="k", model=rng.choice(["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-72b", "smollm2-135m-instruct"]),
            worker_id=f"w{rng.randrange(8)}", hardware_class=rng.choice(["nvidia-h100", "amd-mi300x", "cpu"]),
            device_count=1, prompt_tokens=prompt, cached_tokens=rng.randint(0, prompt), completion_tokens=rng.randint(1, 800),
            gpu_seconds=rng.uniform(0.01, 5), queue_ms=1, ttft_ms=50, total_ms=900, status="OK", finish_reason="stop",
            started_at=ended - 1, ended_at=ended, tags={"feature": rng.choice(["chat", "search", "summary"])})))
    return out


CONCURRENCY = 2
"""Batches in flight at once: one process builds the next batch while Redis runs the last one."""


def batches(count: int, seed: int, prefix: str) -> list[list[UsageRecord]]:
    return [records(min(BATCH, count - start), seed + start, f"{prefix}{start}-") for start in range(0, count, BATCH)]


async def _concurrently(work: list[list[UsageRecord]], write) -> float:  # noqa: ANN001 - async (batch) -> None
    """Seconds to write every batch, CONCURRENCY at a time."""
    queue = list(reversed(work))

    async def worker() -> None:
        while queue:
            await write(queue.pop())
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - began


async def ingest(ledger: Ledger, count: int, seed: int, prefix: str) -> float:
    """Seconds to record `count` records through the atomic script (generating them is not timed)."""
    return await _concurrently(batches(count, seed, prefix), lambda batch: ledger.record_many(batch, now=MONTH.end))


async def plain_xadd(redis, count: int, seed: int) -> float:  # noqa: ANN001
    async def write(batch: list[UsageRecord]) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for record in batch:
                pipe.xadd(f"bench:plain:{{{record.team}}}", {"json": record.to_json()})
            await pipe.execute()
    return await _concurrently(batches(count, seed, "x"), write)


async def bulk_load(ledger: Ledger, count: int, seed: int) -> None:
    """The rest of the million, generated and recorded in slices (not timed)."""
    for start in range(0, count, 50 * BATCH):
        await ingest(ledger, min(50 * BATCH, count - start), seed + start, f"bulk{start}-")


async def run(total: int, sample: int, scan_limit: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data), port=free_port()) as server:
        redis = connect(server.url)
        ledger = Ledger(redis)
        ours_s, plain_s = [], []
        for round_ in range(3):  # alternating samples for the rate
            ours_s.append(await ingest(ledger, sample, 1000 * round_, f"s{round_}-"))
            plain_s.append(await plain_xadd(redis, sample, 1000 * round_))
        await redis.delete(*[k async for k in redis.scan_iter("bench:plain:*")])
        await bulk_load(ledger, total - 3 * sample, 7_000_000)
        recorded = sum([await redis.xlen(keys.ledger(t)) for t in await ledger.teams()])

        group_by = ["team", "project", "model"]
        report_s = []
        for _ in range(3):
            began = time.perf_counter()
            report = await usage_report(ledger, group_by, since=MONTH.start, until=MONTH.end)
            report_s.append(time.perf_counter() - began)
        # The baseline reads the ledger record by record: on a prefix of the teams, scaled up.
        teams = await ledger.teams()
        began = time.perf_counter()
        scanned = 0
        for team in teams:
            async for _ in ledger.records(team, MONTH.start - 0.5, MONTH.end):
                scanned += 1
            if scanned >= scan_limit:
                break
        scan_s = (time.perf_counter() - began) * recorded / scanned
        await redis.aclose()
    ours_rate = sample / statistics.median(ours_s)
    plain_rate = sample / statistics.median(plain_s)
    return {"records": recorded, "report_requests": report.total.requests, "records_per_s": round(ours_rate),
            "plain_xadd_records_per_s": round(plain_rate), "records_vs_plain_xadd": round(ours_rate / plain_rate, 3),
            # Measured, not extrapolated: a rollup report does not grow with the records.
            "report_1m_records_s": round(statistics.median(report_s), 4) if recorded >= 1_000_000 else None,
            "report_s": round(statistics.median(report_s), 4), "ledger_scan_report_s": round(scan_s, 2),
            "rollup_report_vs_ledger_scan": round(scan_s / statistics.median(report_s), 1),
            "report_rows": len(report.rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k records instead of 1M (~30 s)")
    args = parser.parse_args()
    total, sample, scan_limit = (100_000, 10_000, 20_000) if args.quick else (1_000_000, 30_000, 100_000)
    figures = asyncio.run(run(total, sample, scan_limit))
    assert figures["report_requests"] == figures["records"], "the report must cover every record"
    rows = [
        ("ingest, atomic script, pipelined", f"{figures['records_per_s']:,} records/s"),
        ("ingest, plain XADD, pipelined", f"{figures['plain_xadd_records_per_s']:,} records/s "
                                          f"(ours: {figures['records_vs_plain_xadd']:.2f}x)"),
        (f"month report over {figures['records']:,} records", f"{figures['report_s']:.3f} s from the rollups "
                                                                f"({figures['report_rows']} rows)"),
        ("same report from the raw ledger", f"{figures['ledger_scan_report_s']:.1f} s (estimated from a scan of "
                                            f"{scan_limit:,} records): rollups "
                                            f"{figures['rollup_report_vs_ledger_scan']:.0f}x faster"),
    ]
    print_results("accounting: ingestion and reports, one process, real redis-server", rows,
                  {"bench": "accounting", **figures})


if __name__ == "__main__":
    main()
