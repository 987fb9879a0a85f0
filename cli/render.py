"""Terminal rendering shared by the commands (rich tables)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fareway.inference.v1 import inference_pb2 as pb

USAGE_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cache_hit_rate",
                 "gpu_seconds", "cost_usd", "idle_usd", "list_usd", "usd_per_million_tokens")
"""A report's columns: counts, the cache hit rate, GPU-seconds, then cost to serve, idle cost and list
price in USD, and cost to serve plus idle cost per million tokens (prompt and completion)."""
_HEADERS = {"usd_per_million_tokens": "USD per 1M tokens"}
"""Table headers that are not the column's name with spaces."""


def usage_table(usage: pb.Usage, finish_reason: int) -> Table:
    table = Table(title="usage", show_header=False, title_justify="left")
    finish = pb.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_").lower()
    rows = [
        ("finish reason", finish),
        ("prompt tokens", f"{usage.prompt_tokens} ({usage.cached_tokens} cached)"),
        ("completion tokens", str(usage.completion_tokens)),
        ("GPU-seconds", f"{usage.gpu_seconds:.4f} on {usage.device_count} x {usage.hardware_class}"),
        ("queue / first token / total", f"{usage.queue_ms:.0f} / {usage.ttft_ms:.0f} / {usage.total_ms:.0f} ms"),
        ("worker", usage.worker_id),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def totals_table(title: str, group_by: Sequence[str], rows: Sequence[tuple[Sequence[str], Sequence[object]]],
                 total: Sequence[object]) -> Table:
    """A report: one row per group, USAGE_COLUMNS figures, and a total row."""
    table = Table(title=title, title_justify="left")
    for name in group_by:
        table.add_column(name)
    for name in USAGE_COLUMNS:
        table.add_column(_HEADERS.get(name, name.replace("_", " ")), justify="right")
    for group, figures in rows:
        table.add_row(*group, *_format(figures))
    table.add_section()
    table.add_row(*(["total"] + [""] * (len(group_by) - 1) if group_by else []), *_format(total))
    return table


def _format(figures: Sequence[object]) -> list[str]:
    *counts, hit_rate, gpu_seconds, cost_usd, idle_usd, list_usd, usd_per_million_tokens = figures
    return ([f"{int(c):,}" for c in counts] + [f"{float(hit_rate):.1%}", f"{float(gpu_seconds):.3f}"]
            + [f"${float(usd):,.6f}" for usd in (cost_usd, idle_usd, list_usd)]
            + ["-" if usd_per_million_tokens is None else f"${float(usd_per_million_tokens):,.4f}"])


def usage_blocks(title: str, group_by: Sequence[str], rows: Sequence[tuple[Sequence[str], Sequence[object]]],
                 total: Sequence[object]) -> Group:
    """The same report, a block per group, for a terminal too narrow for the table."""
    lines: list[Text] = [Text(f"{title} by {', '.join(group_by) or 'nothing'}", style="bold")]
    for group, figures in [*rows, (["total"], total)]:
        requests, prompt, cached, completion, hit_rate, gpu_seconds, cost, idle, list_, per_million = _format(figures)
        lines += [Text(),
                  Text(" / ".join(value or "-" for value in group), style="bold"),
                  Text(f"  {requests} requests, {gpu_seconds} GPU-seconds"),
                  Text(f"  tokens: {prompt} prompt, {cached} cached ({hit_rate}), {completion} completion"),
                  Text(f"  USD: cost to serve {cost}, idle {idle}, list price {list_}"),
                  Text(f"  cost per 1M tokens: {per_million}")]
    return Group(*lines)
