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

import hashlib
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from fareway.inference.v1 import inference_pb2 as pb
from fareway.registry import WorkerLoad

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


@dataclass(frozen=True)
class Route:
    """What of a request routing looks at."""

    prefix_key: str = ""
    session_id: str = ""


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
    return Route(f"{team}\0{text[:PREFIX_KEY_CHARS]}", request.session_id)


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
    """Requests sharing a prefix key go to the key's rendezvous winner, whose KV cache most likely
    holds the prefix; unless that worker has more than `overload_margin` sequences over the least
    loaded one, when the request goes least-load instead (a hot prefix spills over)."""

    overload_margin: int = 4

    def order(self, workers: Sequence[Routable], route: Route) -> list[Routable]:
        ordered = rendezvous_order(route.prefix_key, workers)
        least = least_load_order(workers)
        if ordered and ordered[0].num_queued > least[0].num_queued + self.overload_margin:
            return least
        return ordered


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
    _policies: dict[str, Policy] = field(init=False, default_factory=dict)
    NAMES: ClassVar[tuple[str, ...]] = tuple(POLICIES)

    def __post_init__(self) -> None:
        for name in (self.default, *self.by_model.values()):
            if name not in POLICIES:
                raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")

    def policy(self, model: str) -> Policy:
        if model not in self._policies:
            self._policies[model] = POLICIES[self.by_model.get(model, self.default)]()
        return self._policies[model]

    def order(self, model: str, workers: Sequence[Routable], route: Route) -> list[Routable]:
        if route.session_id:
            return rendezvous_order(f"session\0{route.session_id}", workers)
        return self.policy(model).order(workers, route)
