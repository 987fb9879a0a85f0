"""Routing policies: the order in which a model's healthy workers are tried for a request.

The first worker is where the request goes; the rest are its failover order
(the dispatcher tries up to --max-attempts of them before the first token).
Policies read the load each worker last published in the registry (or that the
pool last polled), plus what this gateway sent it since, never an RPC per request.

A request with a session id goes, whatever the policy, to the session's
rendezvous-hash winner among the healthy workers: the same worker for as long
as it stays up (and no new worker outranks it), on every gateway replica, with
no shared session table.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from fareway.inference.v1 import inference_pb2 as pb
from fareway.registry import WorkerLoad
from gateway.shared_homes import SharedHomes

PREFIX_KEY_CHARS = 256
"""How much of the prompt's start makes its affinity key."""


class Routable(Protocol):
    """What a policy needs to know of a worker."""

    @property
    def name(self) -> str: ...
    @property
    def load(self) -> WorkerLoad: ...
    @property
    def num_queued(self) -> int:
        """Its waiting + running sequences, counting requests sent since its last load report."""
    @property
    def usd_per_device_hour(self) -> float | None: ...
    @property
    def device_count(self) -> int: ...
    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens its KV cache holds; 0 when not known."""


@dataclass(frozen=True)
class Route:
    """What of a request routing looks at."""

    prefix_key: str = ""
    session_id: str = ""
    prefix_tokens: int = 0
    """About how many tokens the shared prefix (system prompt, or prompt) takes in a KV cache."""


def route_for(request: pb.GenerateRequest | pb.GenerateStreamRequest, team: str) -> Route:
    """The request's affinity key: the team (the prefix cache's privacy boundary: other teams'
    requests cannot reuse its cached prompts), then the first PREFIX_KEY_CHARS characters of the
    system message(s) of a chat, or of its first message when it has none, or of a raw prompt."""
    if request.WhichOneof("input") == "chat":
        messages = request.chat.messages
        system = [m.content for m in messages if m.role == "system"]
        text = "\n".join(system) if system else (messages[0].content if messages else "")
    else:
        text = request.prompt
    # ~4 characters a token: only used to estimate how full each worker's cache is.
    return Route(f"{team}\0{text[:PREFIX_KEY_CHARS]}", request.session_id, len(text) // 4 + 1)


def rendezvous_order(key: str, workers: Sequence[Routable]) -> list[Routable]:
    """Highest random weight first: each key has its own stable order of the workers, and a
    worker leaving moves only the keys it ranked first."""
    def weight(worker: Routable) -> bytes:
        return hashlib.blake2b(f"{key}\0{worker.name}".encode(), digest_size=8).digest()
    return sorted(workers, key=weight, reverse=True)


def least_load_order(workers: Sequence[Routable]) -> list[Routable]:
    return sorted(workers, key=lambda w: (w.num_queued, -w.load.kv_tokens_free, w.name))


class Policy(Protocol):
    def order(self, workers: Sequence[Routable], route: Route) -> list[Routable]: ...


@dataclass
class RoundRobin:
    """Each request starts one further along the list (the baseline)."""

    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def order(self, workers: Sequence[Routable], route: Route) -> list[Routable]:
        ordered = sorted(workers, key=lambda w: w.name)
        shift = next(self._turn) % len(ordered) if ordered else 0
        return ordered[shift:] + ordered[:shift]


@dataclass
class LeastLoad:
    """Fewest waiting + running sequences, then most free KV."""

    def order(self, workers: Sequence[Routable], route: Route) -> list[Routable]:
        return least_load_order(workers)


@dataclass
class PrefixAffinity:
    """Cache-aware routing: requests sharing a prefix key go to the worker that is the key's home,
    whose KV cache most likely holds the prefix.

    A key seen for the first time (or whose home left) gets as home the worker with the least
    prefix tokens homed on it for its KV capacity, ties broken by rendezvous order; so prefixes
    spread evenly over the fleet instead of by the luck of a hash. Homes are kept (least recently
    used first out, past `max_keys`) rather than forgotten when a worker's cache is estimated
    full: estimating tokens from characters overshoots on some text, and a prefix bouncing between
    workers misses on both. A request whose home has more than `overload_margin` sequences over the
    least loaded worker goes least-load instead (a hot prefix spills over).

    With `shared` (gateway/shared_homes.py), the model's gateway replicas agree on homes through
    Redis: the first request a replica sees with a new prefix waits for the replica's claim of its
    home (`first_claim`); one routed without it (Redis slow or unreachable) goes by the replica's
    own view, and the claimed home is adopted when the answer comes. Without it homes are this
    gateway's own, like the per-router prefix trees of SGLang's cache-aware router.
    """

    overload_margin: int = 4
    max_keys: int = 100_000
    shared: SharedHomes | None = None
    _homes: OrderedDict[str, tuple[str, int, float]] = field(default_factory=OrderedDict)
    """key -> (home worker, its prefix tokens, when it was last claimed in `shared`), least recently
    used first."""
    _held: dict[str, int] = field(default_factory=dict)
    """worker -> estimated tokens of the prefixes homed on it."""
    _claims: dict[str, asyncio.Future[str | bytes]] = field(default_factory=dict)
    """key -> its claim sent to `shared` and not answered yet."""

    async def claims_answered(self) -> None:
        """Waits until the claims sent so far have been answered (and adopted)."""
        while self._claims:
            await asyncio.wait(list(self._claims.values()))

    def first_claim(self, workers: Sequence[Routable], route: Route) -> asyncio.Future[str | bytes] | None:
        """With shared homes, for a prefix this replica has no home for among `workers` yet: its claim,
        to wait for before `order`, so that even its first request here goes to the home the replicas
        agree on (one round trip, once per prefix and replica). None when there is nothing to wait for."""
        if self.shared is None or not workers:
            return None
        home = self._homes.get(route.prefix_key)
        if home is not None and any(w.name == home[0] for w in workers):
            return None
        return self._claims.get(route.prefix_key) or self._claim(route, workers)

    def order(self, workers: Sequence[Routable], route: Route) -> list[Routable]:
        if not workers:
            return []
        by_name = {w.name: w for w in workers}
        home = self._homes.get(route.prefix_key)
        if home is not None and home[0] in by_name:
            self._homes.move_to_end(route.prefix_key)
            chosen = by_name[home[0]]
            if self.shared is not None and time.monotonic() - home[2] > self.shared.refresh_s:
                self._claim(route, workers)
        else:
            chosen = self._assign(route, workers)
            if self.shared is not None and route.prefix_key not in self._claims:
                self._claim(route, workers)
        least = least_load_order(workers)
        if chosen.num_queued > least[0].num_queued + self.overload_margin:
            return least
        return [chosen, *(w for w in rendezvous_order(route.prefix_key, workers) if w is not chosen)]

    def _assign(self, route: Route, workers: Sequence[Routable]) -> Routable:
        def room(w: Routable) -> float:
            held = self._held.get(w.name, 0)
            return 1.0 - held / w.kv_capacity_tokens if w.kv_capacity_tokens else -float(held)
        chosen = max(rendezvous_order(route.prefix_key, workers), key=room)  # max keeps the first of equals
        self._home(route.prefix_key, chosen.name, route.prefix_tokens, 0.0)
        return chosen

    def _home(self, key: str, worker: str, prefix_tokens: int, claimed_at: float) -> None:
        self._forget(key)
        self._homes[key] = (worker, prefix_tokens, claimed_at)
        self._held[worker] = self._held.get(worker, 0) + prefix_tokens
        while len(self._homes) > self.max_keys:
            self._forget(next(iter(self._homes)))

    def _claim(self, route: Route, workers: Sequence[Routable]) -> asyncio.Future[str | bytes]:
        """Claims the key's home in `shared`, and adopts the answer when it comes."""
        assert self.shared is not None
        key, claimed_at = route.prefix_key, time.monotonic()
        if (home := self._homes.get(key)) is not None:
            self._homes[key] = (home[0], home[1], claimed_at)  # one claim in flight, not one per request

        def adopt(answer: asyncio.Future[str | bytes]) -> None:
            if self._claims.get(key) is answer:
                del self._claims[key]
            if answer.cancelled() or answer.exception() is not None:
                return  # Redis unreachable: this replica's own homes stand (retried after refresh_s)
            worker = answer.result()
            worker = worker.decode() if isinstance(worker, bytes) else worker
            current = self._homes.get(key)
            if current is None or current[0] != worker:
                self._home(key, worker, route.prefix_tokens, claimed_at)
        answer = self.shared.claim(key, route.prefix_tokens,
                                   [(w.name, w.kv_capacity_tokens) for w in rendezvous_order(key, workers)])
        self._claims[key] = answer
        answer.add_done_callback(adopt)
        return answer

    def _forget(self, key: str) -> None:
        home = self._homes.pop(key, None)
        if home is not None:
            self._held[home[0]] -= home[1]


@dataclass
class Cost:
    """The cheapest worker per generated token (price per device-hour x devices / tokens per second)
    among those with at most `max_queued` sequences; then the rest, least loaded first. A worker
    with no throughput measured yet counts the median of the others' (or `default_tokens_per_s`);
    one with no price goes after the priced ones."""

    max_queued: int = 16
    default_tokens_per_s: float = 20.0

    def usd_per_million_tokens(self, worker: Routable, fallback_tokens_per_s: float) -> float:
        if worker.usd_per_device_hour is None:
            return float("inf")
        tokens_per_s = worker.load.tokens_per_s or fallback_tokens_per_s
        return worker.usd_per_device_hour * worker.device_count / 3600 / tokens_per_s * 1e6

    def order(self, workers: Sequence[Routable], route: Route) -> list[Routable]:
        measured = [w.load.tokens_per_s for w in workers if w.load.tokens_per_s > 0]
        fallback = statistics.median(measured) if measured else self.default_tokens_per_s
        open_ = [w for w in workers if w.num_queued <= self.max_queued]
        cheapest = sorted(open_, key=lambda w: (self.usd_per_million_tokens(w, fallback), w.num_queued, w.name))
        return cheapest + least_load_order([w for w in workers if w.num_queued > self.max_queued])


POLICIES: dict[str, type[Policy]] = {
    "prefix-affinity": PrefixAffinity,
    "least-load": LeastLoad,
    "cost": Cost,
    "round-robin": RoundRobin,
}
DEFAULT_POLICY = "prefix-affinity"


@dataclass
class Router:
    """A policy per model: `default` for every model not named in `by_model`."""

    default: str = DEFAULT_POLICY
    by_model: dict[str, str] = field(default_factory=dict)
    shared_homes: Callable[[str], SharedHomes] | None = None
    """A model's prefix homes shared with the other gateway replicas, for prefix-affinity."""
    _policies: dict[str, Policy] = field(init=False, default_factory=dict)
    NAMES: ClassVar[tuple[str, ...]] = tuple(POLICIES)

    def __post_init__(self) -> None:
        for name in (self.default, *self.by_model.values()):
            if name not in POLICIES:
                raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")

    def policy(self, model: str) -> Policy:
        if model not in self._policies:
            policy = POLICIES[self.by_model.get(model, self.default)]
            if policy is PrefixAffinity and self.shared_homes is not None:
                self._policies[model] = PrefixAffinity(shared=self.shared_homes(model))
            else:
                self._policies[model] = policy()
        return self._policies[model]

    def first_claim(self, model: str, workers: Sequence[Routable], route: Route) -> asyncio.Future[str | bytes] | None:
        """What to wait for before `order` (PrefixAffinity.first_claim), if anything."""
        if route.session_id:
            return None
        policy = self.policy(model)
        return policy.first_claim(workers, route) if isinstance(policy, PrefixAffinity) else None

    def order(self, model: str, workers: Sequence[Routable], route: Route) -> list[Routable]:
        if route.session_id:
            return rendezvous_order(f"session\0{route.session_id}", workers)
        return self.policy(model).order(workers, route)
