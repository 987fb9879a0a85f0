"""The Lua scripts are files in fareway/redis/lua/, each one used, composed as the code names them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fareway.redis.scripts import lua

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "fareway" / "redis" / "lua"


def named_in_code() -> set[str]:
    """Every file name a `lua(...)` call in the packages passes."""
    names = set()
    for package in ("fareway", "gateway", "workers", "accounting", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lua":
                    names |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
    return names


def test_every_lua_file_is_used_and_every_name_used_is_a_file() -> None:
    assert {path.stem for path in LUA.glob("*.lua")} == named_in_code()


def test_a_script_is_its_files_in_order_with_every_placeholder_filled() -> None:
    source = lua("reservation", "budget_release")
    assert source.index("local function release") < source.index("return release(")
    with pytest.raises(KeyError, match="METRIC_NAMES"):
        lua("reservation", "ledger_record")


def test_every_script_compiles_in_redis(redis_client) -> None:  # noqa: ANN001
    from accounting.ledger import _RECORD_SCRIPT

    sources = [_RECORD_SCRIPT, lua("clock", "limits_admit"), lua("clock", "limits_settle"), lua("budget_reserve"),
               lua("reservation", "budget_release"), lua("idempotency_claim"), lua("idempotency_complete"),
               lua("fair_counters_sync"), lua("prefix_home_claim")]
    assert len({redis_client.script_load(source) for source in sources}) == len(sources)
