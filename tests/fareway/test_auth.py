"""API keys against a real Redis: created once, stored hashed, revocable."""

from __future__ import annotations

import pytest
import redis

from fareway.auth import KeyStore, Role, bearer_token
from fareway.errors import InvalidArgument, NotFound, Unauthenticated

pytestmark = pytest.mark.redis_cluster


@pytest.fixture()
def with_store(with_redis):  # noqa: ANN001, ANN201
    return lambda body: with_redis(lambda client: body(KeyStore(client)))


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_a_created_key_authenticates_as_its_team_and_project(with_store) -> None:
    async def body(store: KeyStore):  # noqa: ANN202
        key, info = await store.create("search", "ranking")
        return key, info, await store.authenticate(bearer(key))
    key, info, tenant = with_store(body)
    assert (tenant.team, tenant.project, tenant.key_id, tenant.role) == ("search", "ranking", info.key_id, Role.TENANT)
    assert key.startswith(f"fw_{info.key_id}_")


def test_keys_are_stored_only_as_hashes(with_store, redis_client: redis.Redis) -> None:
    key, _ = with_store(lambda store: store.create("search", "ranking"))
    dump = []
    for name in redis_client.scan_iter():
        dump.append(name)
        kind = redis_client.type(name)
        dump.extend(redis_client.hgetall(name).items() if kind == "hash" else [])
    assert dump and not any(key in str(item) for item in dump)
    secret = key.split("_", 2)[2]
    assert not any(secret in str(item) for item in dump)


def test_revoked_and_unknown_keys_are_refused_alike(with_store) -> None:
    async def body(store: KeyStore):  # noqa: ANN202
        key, info = await store.create("search", "ranking")
        await store.revoke(info.key_id)
        errors = []
        for candidate in (key, key + "x"):
            with pytest.raises(Unauthenticated) as caught:
                await store.authenticate(bearer(candidate))
            errors.append(caught.value.message)
        listed = await store.list()
        return errors, listed
    errors, listed = with_store(body)
    assert errors[0] == errors[1]
    assert [info.revoked_at is not None for info in listed] == [True]


def test_missing_or_malformed_authorization_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="missing API key"):
        bearer_token([("x-other", "1")])
    with pytest.raises(Unauthenticated, match="Bearer"):
        bearer_token([("authorization", "Basic abc")])
    assert bearer_token([("authorization", "bearer  k1 ")]) == "k1"


def test_bad_names_and_unknown_ids_are_refused(with_store) -> None:
    with pytest.raises(InvalidArgument, match="team"):
        with_store(lambda store: store.create("Search Team", "x"))
    with pytest.raises(InvalidArgument, match="project"):
        with_store(lambda store: store.create("search", "{x}"))
    with pytest.raises(NotFound):
        with_store(lambda store: store.revoke("nope"))


def test_admin_keys_carry_their_role(with_store) -> None:
    async def body(store: KeyStore):  # noqa: ANN202
        key, _ = await store.create("platform", "ops", Role.ADMIN)
        return await store.authenticate(bearer(key))
    assert with_store(body).is_admin


def test_a_cached_key_is_forgotten_as_soon_as_it_is_revoked(with_redis) -> None:  # noqa: ANN001
    """A gateway remembers valid keys for a few seconds, but a revocation reaches it at once."""
    import asyncio

    async def body(client):  # noqa: ANN001, ANN202
        admin, gateway = KeyStore(client), KeyStore(client, cache_ttl_s=60)
        watcher = asyncio.create_task(gateway.watch_revocations())
        try:
            from fareway.redis.keys import api_key as _digest_key
            other, _ = await admin.create("search", "other")
            await gateway.authenticate(bearer(other))
            await client.delete(_digest_key(other))           # gone from Redis, still remembered
            assert (await gateway.authenticate(bearer(other))).project == "other"
            key, info = await admin.create("search", "ranking")
            await gateway.authenticate(bearer(key))          # now cached for a minute
            await asyncio.sleep(0.2)                          # the watcher has subscribed
            await admin.revoke(info.key_id)
            for _ in range(50):
                try:
                    await gateway.authenticate(bearer(key))
                except Unauthenticated:
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            watcher.cancel()
    assert with_redis(body)
