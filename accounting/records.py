"""A usage record: what one request consumed, whom it is charged to, how it ended."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

_INT_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "device_count", "cost_nusd", "list_nusd")
_FLOAT_FIELDS = ("gpu_seconds", "queue_ms", "ttft_ms", "total_ms", "started_at", "ended_at")


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    """Unique per team and project; the client's idempotency key if it gave one."""
    team: str
    project: str
    key_id: str
    model: str
    worker_id: str
    hardware_class: str
    device_count: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    gpu_seconds: float
    queue_ms: float
    ttft_ms: float
    total_ms: float
    """Time in the gateway, from arrival to the last byte."""
    status: str
    """The gRPC status code name the caller got: OK, CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, ..."""
    finish_reason: str
    """stop, stop_sequence, length, cancelled, error."""
    started_at: float
    """Unix seconds."""
    ended_at: float
    tags: dict[str, str] = field(default_factory=dict)
    cost_nusd: int = 0
    """Cost to serve in nano-dollars: GPU-seconds (every device counted) x the hardware's price."""
    list_nusd: int = 0
    """List price in nano-dollars: tokens x the model's prices, cached prompt tokens at their own."""
    price_version: str = ""
    """The price book version that priced the record ("" until priced)."""
    budget_period: str = ""
    """The month (YYYY-MM) whose budget reserved this request's maximum cost at admission, if any."""
    metering: str = ""
    """How gpu_seconds was metered: "engine-steps" (Fareway's engine) or "observed" (a worker in front of
    another engine); "" in records written before it was kept."""
    token_source: str = ""
    """Who counted the tokens: "engine", or "tokenizer" (the engine reported none)."""

    @property
    def gpu_nanoseconds(self) -> int:
        """GPU-seconds as an integer, for exact sums."""
        return round(self.gpu_seconds * 1e9)

    def to_json(self) -> str:
        """The record as the ledger stores it: one compact JSON object."""
        # Not dataclasses.asdict: it deep-copies every value, and this is on the hot path.
        return json.dumps({name: getattr(self, name) for name in _FIELD_NAMES}, separators=(",", ":"))

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for a Redis stream entry."""
        values = asdict(self)
        values["tags"] = json.dumps(self.tags, sort_keys=True, separators=(",", ":"))
        return {name: value if isinstance(value, str) else repr(value) for name, value in values.items()}

    @classmethod
    def from_fields(cls, values: dict[str, str]) -> UsageRecord:
        """A ledger entry: {"json": ...} as written now, or one field per attribute as written before."""
        if "json" in values:
            return cls(**json.loads(values["json"]))
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, object] = {k: v for k, v in values.items() if k in known}
        for name in _INT_FIELDS:
            kwargs[name] = int(values.get(name, 0))
        for name in _FLOAT_FIELDS:
            kwargs[name] = float(values[name])
        kwargs["tags"] = json.loads(values.get("tags") or "{}")
        return cls(**kwargs)  # type: ignore[arg-type]


_FIELD_NAMES = tuple(f.name for f in fields(UsageRecord))
