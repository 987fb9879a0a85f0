"""The batcher's use of redis-py's private parts (fareway/redis/redis_py.py) is held to the redis-py
releases it was written for, and the dependency's bound in pyproject.toml says the same."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path

import pytest
import redis

from fareway.redis import redis_py

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_redis_py_is_one_the_adapter_was_written_for() -> None:
    # If this fails after an upgrade: check redis_py.py's private uses against the new release, then add
    # it to SUPPORTED_VERSIONS and to pyproject.toml's bound. Until then the batcher uses pipelines.
    redis_py.check_version(redis.__version__)
    assert redis_py.is_supported()


@pytest.mark.parametrize("version", ["8.2.0", "9.0.1", "7.4.1", "unknown"])
def test_another_redis_py_is_refused_by_name(version: str) -> None:
    with pytest.raises(redis_py.UnsupportedRedisPy, match=re.escape(f"not {version}")):
        redis_py.check_version(version)


def test_pyproject_bounds_redis_py_to_the_supported_releases() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in dependencies if re.match(r"redis\b(?!lite)", d)]
    (major, minor), *_ = redis_py.SUPPORTED_VERSIONS
    last_major, last_minor = redis_py.SUPPORTED_VERSIONS[-1]
    assert spec == f"redis>={major}.{minor}.0,<{last_major}.{last_minor + 1}"


def test_the_private_parts_answer_as_the_batcher_expects() -> None:
    assert isinstance(redis_py.parse_error("NOSCRIPT No matching script."), redis.exceptions.NoScriptError)
    assert isinstance(redis_py.parse_error("LOADING Redis is loading the dataset"), redis.exceptions.BusyLoadingError)
    assert type(redis_py.parse_error("ERR something")) is redis.exceptions.ResponseError
    callbacks = redis_py.reply_callbacks()
    assert callbacks["set"]("OK") is True and callbacks["SET"]("OK") is True  # any case, as redis-py


def test_an_unsupported_redis_py_sends_batches_through_public_pipelines(with_redis, monkeypatch) -> None:  # noqa: ANN001
    """Correct, if slower: the batcher's callers see the same replies."""
    from fareway.redis.batch import batched_script, batcher_for

    monkeypatch.setattr(redis, "__version__", "99.0.0")
    redis_py.is_supported.cache_clear()
    try:
        async def body(client) -> tuple[list[int], str, bool]:  # noqa: ANN001
            script = batched_script(client, "return redis.call('INCRBY', KEYS[1], ARGV[1])")
            batcher = batcher_for(client)
            replies = await asyncio.gather(script(keys=["n"], args=[2]), script(keys=["n"], args=[3]),
                                           batcher.command("SET", "k", "v"))
            return replies, await client.get("k"), batcher._is_direct
        (first, second, set_reply), stored, direct = with_redis(body)
    finally:
        redis_py.is_supported.cache_clear()
    assert (first, second, set_reply, stored, direct) == (2, 5, True, "v", False)
