"""API keys: each names a tenant (a team and a project) and a role.

Keys are random, shown once at creation, and stored only as SHA-256 digests:
a leaked Redis dump reveals no usable key. (A slow hash such as bcrypt guards
low-entropy passwords; these keys carry 192 random bits, so one fast hash is
enough and keeps authentication to one Redis round trip.)
"""

from __future__ import annotations

import asyncio
import enum
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from fareway.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, shown
from fareway.redis import UNREACHABLE, keys

KEY_PREFIX = "fw"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_MAX_CACHED_KEYS = 100_000


class Role(enum.Enum):
    TENANT = "tenant"
    """May generate and read its own team's usage."""
    ADMIN = "admin"
    """May also read every team's usage and manage keys."""


@dataclass(frozen=True)
class Tenant:
    """Who a request is charged to."""

    team: str
    project: str
    key_id: str
    role: Role = Role.TENANT

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    team: str
    project: str
    role: Role
    created_at: float
    revoked_at: float | None


def validate_name(kind: str, value: str) -> str:
    """Team and project names end up in Redis keys and reports: keep them plain."""
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{kind} {shown(value)} must be 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            field=kind)
    return value


class KeyStore:
    """Creates, lists, revokes and checks API keys in Redis."""

    def __init__(self, redis: aioredis.Redis, cache_ttl_s: float = 0.0) -> None:
        """cache_ttl_s: how long a valid key's tenant is remembered without asking Redis (a
        gateway's hot path); a revocation then takes up to that long to apply. 0: no cache."""
        self._redis = redis
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[Tenant, float]] = {}

    async def create(self, team: str, project: str, role: Role = Role.TENANT) -> tuple[str, KeyInfo]:
        """Creates a key and returns it (the only time it is ever visible) with its info."""
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
        info = KeyInfo(key_id, validate_name("team", team), validate_name("project", project),
                       role, time.time(), None)
        digest = keys.api_key(key)
        # The key, then its index entry, one after the other (they lie in different Redis Cluster slots):
        # an index entry always names a key that is there, and a key whose entry a failure left unwritten
        # was never handed out.
        await self._redis.hset(digest, mapping={"key_id": key_id, "team": team, "project": project,
                                                "role": role.value, "created_at": repr(info.created_at)})
        await self._redis.hset(keys.API_KEYS, key_id, digest)
        return key, info

    async def list(self) -> list[KeyInfo]:
        digests = await self._redis.hgetall(keys.API_KEYS)
        async with self._redis.pipeline(transaction=False) as pipe:
            for digest in digests.values():
                pipe.hgetall(digest)
            records = await pipe.execute()
        infos = [_info(record) for record in records if record]
        return sorted(infos, key=lambda info: (info.team, info.project, info.created_at))

    async def revoke(self, key_id: str) -> KeyInfo:
        digest = await self._redis.hget(keys.API_KEYS, key_id)
        if digest is None:
            raise NotFound(f"no API key with id {shown(key_id)}")
        await self._redis.hsetnx(digest, "revoked_at", repr(time.time()))
        # Gateways caching the key drop it now (watch_revocations); the cache's TTL bounds a lost message.
        await self._redis.publish(keys.API_KEY_REVOCATIONS, digest)
        return _info(await self._redis.hgetall(digest))

    async def watch_revocations(self) -> None:
        """Forgets cached keys as they are revoked anywhere; runs until cancelled (a gateway task).
        A dropped connection is retried; what is missed meanwhile lapses with the cache's TTL."""
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.API_KEY_REVOCATIONS)
                    async for message in pubsub.listen():
                        self._cache.pop(message["data"], None)
            except UNREACHABLE:
                await asyncio.sleep(1.0)

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant named by `authorization: Bearer <key>` (an HTTP header, or gRPC metadata: header names
        in lower case)."""
        digest = keys.api_key(bearer_token(metadata))
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        record = await self._redis.hgetall(digest)
        if not record or "revoked_at" in record:
            self._cache.pop(digest, None)
            # One message for unknown and revoked keys: never confirm a key exists.
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        tenant = Tenant(record["team"], record["project"], record["key_id"], Role(record["role"]))
        if self._cache_ttl_s > 0:
            if len(self._cache) > _MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (tenant, time.monotonic() + self._cache_ttl_s)
        return tenant


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for name, value in metadata or ():
        if name == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header (gRPC metadata) must be 'Bearer <API key>'")
            return token.strip()
    raise Unauthenticated("missing API key: send the header (gRPC metadata) 'authorization: Bearer <API key>'")


def require_admin(tenant: Tenant, action: str) -> None:
    if not tenant.is_admin:
        raise PermissionDenied(f"{action} needs an admin key; key {tenant.key_id} is a tenant key")


def _info(record: dict[str, str]) -> KeyInfo:
    revoked = record.get("revoked_at")
    return KeyInfo(record["key_id"], record["team"], record["project"], Role(record["role"]),
                   float(record["created_at"]), float(revoked) if revoked else None)
