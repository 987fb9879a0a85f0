"""Every Redis key is built in fareway/redis/keys.py, and each family is hash-tagged by what it
belongs to, so that the keys a script or a transaction touches together share a Cluster slot."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from fareway.redis import keys

ROOT = Path(__file__).resolve().parents[2]

TEAM = {"limits", "rate", "inflight", "budgets", "spend", "reservations", "alerts", "ledger", "recorded", "rollup",
        "rollup_index", "request_id_claim"}
MODEL = {"fair_counters", "prefix_homes"}
WORKER = {"device_time", "device_time_hours", "worker_info"}
REGISTRY = {"REGISTERED_WORKERS", "registered_worker", "gateways"}
GATEWAY = {"gateway_journal", "gateway_alive", "gateway_sweeping"}
GLOBAL = {"API_KEYS", "api_key", "TEAMS", "PRICE_BOOK_VERSIONS", "PRICE_BOOK_CURRENT", "DEVICE_TIME_WORKERS",
          "JOURNALED_GATEWAYS"}
"""Read and written on their own (keys.py's docstring says where not)."""
NOT_KEYS = {"PREFIX", "LIMITS_PATTERN", "API_KEY_REVOCATIONS", "team_of"}

SAMPLE = {"team": "search", "project": "ranking", "request_id": "r-1", "scope": "project:ranking",
          "month": "2026-11", "level": "h", "bucket": "2026-11-24T09", "model": "llama-3.1-8b",
          "worker_id": "gpu-7", "hour": "2026-11-24T09", "key": "fw_abc_secret", "gateway_id": "gateway-1"}


def hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes a key by: the text between the first { and the next }, if any."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else None


def built(name: str) -> list[str]:
    """The keys a family's builder makes from the sample names (a constant is its own key)."""
    value = getattr(keys, name)
    if isinstance(value, str):
        return [value]
    made = value(**{p: SAMPLE[p] for p in inspect.signature(value).parameters})
    return list(made) if isinstance(made, tuple) else [made]


def test_every_key_family_is_listed_here() -> None:
    public = {name for name, value in vars(keys).items()
              if not name.startswith("_") and (isinstance(value, str) or inspect.isfunction(value))
              and getattr(value, "__module__", keys.__name__) == keys.__name__}
    assert public == TEAM | MODEL | WORKER | REGISTRY | GATEWAY | GLOBAL | NOT_KEYS


def test_team_keys_are_tagged_by_their_team() -> None:
    for name in TEAM:
        assert [hash_tag(key) for key in built(name)] == ["search"], name
    assert keys.team_of(keys.limits("search")) == "search"


def test_model_keys_are_tagged_by_their_model() -> None:
    for name in MODEL:
        for key in built(name):
            assert hash_tag(key) in ("llama-3.1-8b", "routing:llama-3.1-8b"), key
    assert len({hash_tag(key) for key in keys.prefix_homes("m")}) == 1  # one script takes all three


def test_a_gateways_journal_keys_share_its_slot() -> None:
    for name in GATEWAY:
        assert [hash_tag(key) for key in built(name)] == ["gateway:gateway-1"], name


def test_worker_keys_are_tagged_by_their_worker_and_the_registry_shares_one_slot() -> None:
    for name in WORKER:
        assert [hash_tag(key) for key in built(name)] == ["worker:gpu-7"], name
    for name in REGISTRY:
        assert [hash_tag(key) for key in built(name)] == ["registry"], name


def test_global_keys_have_no_tag_and_no_key_names_an_api_key_in_clear() -> None:
    for name in GLOBAL:
        assert all(hash_tag(key) is None and key.startswith("fw:") for key in built(name)), name
    assert "fw_abc_secret" not in keys.api_key("fw_abc_secret")


def test_no_other_module_spells_a_key() -> None:
    """A key built anywhere else would escape the checks above."""
    spelled = []
    for package in ("fareway", "gateway", "workers", "accounting", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "fareway" / "redis" / "keys.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                parts = node.values if isinstance(node, ast.JoinedStr) else [node]
                first = parts[0] if parts else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("fw:"):
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert spelled == []
