"""`fareway plan`: weights, KV cache, concurrent conversations and cost of a model on a hardware
class, for one configuration or several side by side (--compare). Reads only the model's config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook
from cli.planner import (
    COMPARE_AXES,
    GIB,
    HARDWARE,
    PRESETS,
    Plan,
    PlanSettings,
    deployments,
    device_hour_price,
    parse_compare,
    plan,
    resolve_model,
)
from workers.models.config import LlamaConfig
from workers.sizing import KV_DTYPES, WEIGHT_DTYPES

DEFAULT_CONTEXT_LENGTH_TOKENS = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help=f"a .gguf file, a Hugging Face folder, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--hardware", default="nvidia-h100", metavar="NAME",
                        help=f"hardware class ({', '.join(HARDWARE)}) or a name like H100, MI300X")
    parser.add_argument("--weights", default="int8", metavar="DTYPE",
                        help=f"weight dtype: {', '.join(WEIGHT_DTYPES)}, or auto: the compute dtype, bf16 "
                             f"(fp32 on a CPU) (default: %(default)s, as `fareway worker`)")
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                        help=f"KV cache dtype: {', '.join(KV_DTYPES)}; auto is the compute dtype")
    parser.add_argument("--tensor-parallel-size", "--tp", default=1, type=int, metavar="N",
                        help="devices per replica")
    parser.add_argument("--context-length", type=int, default=None, metavar="TOKENS",
                        help="tokens per conversation (prompt and completion) for the concurrency figure; "
                             f"default {DEFAULT_CONTEXT_LENGTH_TOKENS} or the model's context if shorter")
    parser.add_argument("--memory-utilization", type=float, default=0.9, metavar="SHARE",
                        help="share of each device's memory the worker may use (default 0.9)")
    parser.add_argument("--activation-reserve-gib", type=float, default=1.0, metavar="GIB",
                        help="GiB per device kept for activations, out of the usable memory (default 1)")
    parser.add_argument("--memory-gib", "--memory", type=float, default=None, metavar="GIB",
                        help="memory per device, overriding the hardware class's "
                             f"(a CPU host counts as {HARDWARE['cpu'].memory_gib:g} GiB unless given)")
    parser.add_argument("--block-size", type=int, default=16, metavar="TOKENS", help="tokens per KV block")
    parser.add_argument("--tokens-per-second", type=float, default=None, metavar="X",
                        help="throughput of one replica (measured or stated), for the price per 1M tokens")
    parser.add_argument("--prices", type=Path, default=None, metavar="FILE",
                        help="price book (TOML) for $/device-hour; default: the packaged default price book")
    parser.add_argument("--usd-per-device-hour", type=float, default=None, metavar="USD",
                        help="overrides the price book")
    parser.add_argument("--compare", nargs="+", metavar="AXIS=V1,V2", default=[],
                        help=f"plan every combination of the listed values; axes: {', '.join(COMPARE_AXES)} "
                             "(e.g. weights=fp16,int8 kv=fp16,fp8_e4m3 hardware=h100,mi300x tp=4)")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")


def run(args: argparse.Namespace) -> int:
    name, config = resolve_model(args.model)
    settings = PlanSettings(
        context_length_tokens=(min(DEFAULT_CONTEXT_LENGTH_TOKENS, config.max_position_embeddings)
                               if args.context_length is None else args.context_length),
        memory_utilization=args.memory_utilization,
        activation_reserve_gib=args.activation_reserve_gib, memory_gib_per_device=args.memory_gib,
        block_size=args.block_size, tokens_per_second=args.tokens_per_second)
    base = {"hardware": args.hardware, "weights": args.weights, "kv": args.kv_cache_dtype,
            "tensor_parallel_size": args.tensor_parallel_size}
    book = None if args.usd_per_device_hour is not None else PriceBook.load(args.prices or DEFAULT_PRICE_BOOK)
    now = time.time()
    plans = [plan(config, deployment, settings,
                  args.usd_per_device_hour if book is None else device_hour_price(deployment.hardware, book, now))
             for deployment in deployments(base, parse_compare(args.compare))]
    if args.json:
        json.dump(plans_json(name, config, plans), sys.stdout, indent=2)
        print()
    else:
        Console().print(plans_table(name, config, plans))
    return 0


def plans_json(name: str, config: LlamaConfig, plans: list[Plan]) -> dict:
    return {"model": name, "parameters": config.num_parameters, "plans": [p.to_dict() for p in plans]}


def plans_table(name: str, config: LlamaConfig, plans: list[Plan]) -> Table:
    """One configuration: every figure, one per row. Several: a configuration per row and the
    figures that tell them apart as columns."""
    title = (f"{name}: {config.num_parameters / 1e9:.2f} B parameters, {config.num_layers} layers, "
             f"{config.num_kv_heads} KV heads x {config.head_dim}; conversations of "
             f"{plans[0].context_length_tokens:,} tokens")
    has_price_per_token = plans[0].tokens_per_second is not None
    if len(plans) == 1:
        table = Table("", plans[0].deployment.label, title=title, title_justify="left")
        for label, cell in _ROWS + (_PRICE_PER_TOKEN_ROW if has_price_per_token else ()):
            table.add_row(label, cell(plans[0]))
        return table
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1, 0, 0),
                  header_style="bold underline",
                  caption=_COLUMNS_CAPTION,
                  caption_justify="left")
    columns = _COLUMNS + (_PRICE_PER_TOKEN_COLUMN if has_price_per_token else ())
    for label, _ in columns:
        table.add_column(label, justify="left" if label in _TEXT_COLUMNS else "right", no_wrap=True)
    for p in plans:
        table.add_row(*(cell(p) for _, cell in columns))
    return table


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:,.2f}"


def _fits(p: Plan) -> str:
    if not p.fits_weights:
        return "[red]no[/]: weights"
    if not p.fits_one_sequence:
        return "[red]no[/]: KV"
    return "[green]yes[/]"


def _devices(p: Plan) -> str:
    """"4 x h100": the vendor is in the hardware class, not needed to tell classes apart."""
    return f"{p.deployment.tensor_parallel_size} x {p.deployment.hardware.split('-', 1)[-1]}"


def _usd_per_million_tokens(p: Plan) -> str:
    return f"{p.usd_per_million_tokens:.4f}"


_ROWS = (
    ("memory per device, GiB", lambda p: _gib(p.memory_bytes_per_device)),
    ("usable per device, GiB", lambda p: _gib(p.usable_bytes_per_device)),
    ("weights per device, GiB", lambda p: _gib(p.weight_bytes_per_device)),
    ("activation reserve per device, GiB", lambda p: _gib(p.activation_reserve_bytes_per_device)),
    ("KV cache per device, GiB", lambda p: _gib(p.kv_cache_bytes_per_device)),
    ("KV bytes per token, per device", lambda p: f"{p.kv_bytes_per_token_per_device:,}"),
    ("KV bytes per token, per replica", lambda p: f"{p.kv_bytes_per_token_per_replica:,}"),
    ("KV capacity, tokens", lambda p: f"{p.kv_capacity_tokens:,}"),
    ("conversations at once", lambda p: f"{p.max_concurrent_sequences:,}"),
    ("fits", _fits),
    ("USD per device-hour", lambda p: f"{p.usd_per_device_hour:.2f}"),
    ("USD per replica-hour", lambda p: f"{p.usd_per_replica_hour:.2f}"),
)
_PRICE_PER_TOKEN_ROW = (("USD per 1M tokens", _usd_per_million_tokens),)
"""The figures of one plan; "per device" is per GPU (or CPU host), and a replica is
tensor_parallel_size devices."""
_COLUMNS = (
    ("devices", _devices),
    ("weights", lambda p: p.deployment.weight_dtype),
    ("KV", lambda p: p.deployment.kv_dtype),
    ("W GiB", lambda p: _gib(p.weight_bytes_per_device)),
    ("KV GiB", lambda p: _gib(p.kv_cache_bytes_per_device)),
    ("KV tokens", lambda p: f"{p.kv_capacity_tokens:,}"),
    ("convs", lambda p: f"{p.max_concurrent_sequences:,}"),
    ("fits", _fits),
    ("USD/h", lambda p: f"{p.usd_per_replica_hour:.2f}"),
)
_PRICE_PER_TOKEN_COLUMN = (("USD/1M", _usd_per_million_tokens),)
"""The figures that tell configurations apart, for --compare."""
_COLUMNS_CAPTION = ("W GiB, KV GiB: weights and KV cache per device; KV tokens: the replica's KV capacity; convs: conversations at once; "
                    "USD/h: per replica-hour; USD/1M: per 1M tokens")
_TEXT_COLUMNS = {"devices", "weights", "KV", "fits"}
