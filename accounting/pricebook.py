"""The price book: what a device-hour of each hardware class and a million
tokens of each model cost, and from when.

A price book is a versioned TOML file (see accounting/prices/default.toml).
Every price has an `effective_from` instant and applies until the next entry
for the same item, so a usage record is always priced with the price in force
when its request ended, and loading a new version never reprices the past: a
version may only add prices that take effect later than every record
already priced (enforced when it is loaded; see PriceBookStore.load).

Money is counted in integer nano-dollars (1e-9 USD): a token of a cheap model
costs a few of them, and sums of integers are exact, so totals reconcile to
the cent and below.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import json
import logging
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from accounting.records import UsageRecord
from fareway.quota import NANO_USD_PER_USD

log = logging.getLogger(__name__)

DEFAULT_PRICE_BOOK = Path(__file__).parent / "prices" / "default.toml"
ANY = "*"
"""The entry that prices hardware classes and models without one of their own."""
P = TypeVar("P", "HardwarePrice", "ModelPrice")


@dataclass(frozen=True)
class HardwarePrice:
    hardware_class: str
    usd_per_device_hour: float
    effective_from: float
    """Unix seconds."""

    def __post_init__(self) -> None:
        if not self.hardware_class:
            raise ValueError("a hardware price needs its class")
        _check_on_the_hour(self.effective_from, self.hardware_class)
        if not self.usd_per_device_hour >= 0:
            raise ValueError(f"{self.hardware_class}: usd_per_device_hour must be >= 0")

    def cost_nusd(self, device_seconds: float) -> int:
        """Device time at this price (GPU-seconds already count every device)."""
        return round(device_seconds * self.usd_per_device_hour / 3600 * NANO_USD_PER_USD)


@dataclass(frozen=True)
class ModelPrice:
    model: str
    usd_per_million_prompt_tokens: float
    usd_per_million_cached_prompt_tokens: float
    """Prompt tokens served from the prefix cache: discounted, never at the full input rate."""
    usd_per_million_completion_tokens: float
    effective_from: float

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a model price needs its model name (or '*')")
        _check_on_the_hour(self.effective_from, self.model)
        for name in ("usd_per_million_prompt_tokens", "usd_per_million_cached_prompt_tokens",
                     "usd_per_million_completion_tokens"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{self.model}: {name} must be >= 0")

    def list_price_nusd(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """Tokens at list price; cached prompt tokens at their own (discounted) price."""
        usd_millionths = ((prompt_tokens - cached_tokens) * self.usd_per_million_prompt_tokens
                          + cached_tokens * self.usd_per_million_cached_prompt_tokens
                          + completion_tokens * self.usd_per_million_completion_tokens)
        return round(usd_millionths * NANO_USD_PER_USD / 10**6)


class _Timeline(Generic[P]):
    """One item's prices in order of effective_from."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.prices: list[P] = []

    def append(self, price: P) -> None:
        if self.starts and self.starts[-1] == price.effective_from:
            raise ValueError(f"two prices of the same item take effect at the same instant: {price}")
        self.starts.append(price.effective_from)
        self.prices.append(price)

    def at(self, instant: float) -> P | None:
        index = bisect.bisect_right(self.starts, instant)
        return self.prices[index - 1] if index else None


@dataclass(frozen=True)
class PriceBook:
    version: str
    currency: str = "USD"
    hardware: tuple[HardwarePrice, ...] = ()
    models: tuple[ModelPrice, ...] = ()
    _hardware_index: dict[str, _Timeline[HardwarePrice]] = field(default_factory=dict, repr=False, compare=False)
    _model_index: dict[str, _Timeline[ModelPrice]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.version:
            raise ValueError("a price book needs a version")
        if self.currency != "USD":
            raise ValueError(f"only USD price books are supported, got {self.currency!r}")
        for entries, key, index in ((self.hardware, "hardware_class", self._hardware_index),
                                    (self.models, "model", self._model_index)):
            for entry in sorted(entries, key=lambda e: e.effective_from):
                index.setdefault(getattr(entry, key), _Timeline()).append(entry)

    def hardware_price(self, hardware_class: str, at: float) -> HardwarePrice | None:
        """The price of a device-hour of this class in force at `at` (unix seconds), or the '*' entry's."""
        return _first_in_force(self._hardware_index, (hardware_class, ANY), at)

    def model_price(self, model: str, at: float) -> ModelPrice | None:
        """The model's token prices in force at `at`, or the '*' entry's if it has none."""
        return _first_in_force(self._model_index, (model, ANY), at)

    def prices_before(self, instant: float) -> tuple[set[HardwarePrice], set[ModelPrice]]:
        """Every price that took effect before `instant`: the part of the book history depends on."""
        return ({p for p in self.hardware if p.effective_from < instant},
                {p for p in self.models if p.effective_from < instant})

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "currency": self.currency,
                           "hardware": [asdict(p) for p in self.hardware],
                           "models": [asdict(p) for p in self.models]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PriceBook:
        data = json.loads(text)
        return cls(data["version"], data["currency"], tuple(HardwarePrice(**p) for p in data["hardware"]),
                   tuple(ModelPrice(**p) for p in data["models"]))

    @classmethod
    def from_toml(cls, text: str) -> PriceBook:
        """Parses a price book file; raises ValueError naming what is wrong."""
        try:
            data = tomllib.loads(text)
            hardware = tuple(HardwarePrice(h["class"], float(h["usd_per_device_hour"]),
                                           _instant(h["effective_from"])) for h in data.get("hardware", []))
            models = tuple(ModelPrice(m["name"], float(m["usd_per_million_prompt_tokens"]),
                                      float(m["usd_per_million_cached_prompt_tokens"]),
                                      float(m["usd_per_million_completion_tokens"]),
                                      _instant(m["effective_from"])) for m in data.get("model", []))
            return cls(str(data["version"]), str(data.get("currency", "USD")), hardware, models)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not a valid price book: {exc}") from None
        except KeyError as exc:
            raise ValueError(f"price book entry is missing {exc}") from None
        except TypeError as exc:
            raise ValueError(f"price book has a value of the wrong type: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> PriceBook:
        try:
            return cls.from_toml(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read price book {path}: {exc}") from None


def _check_on_the_hour(instant: float, item: str) -> None:
    # Rollups and exports are hourly: one price per item and hour keeps quantity x price = cost per row.
    if instant % 3600:
        raise ValueError(f"{item}: prices take effect on the hour (UTC), got effective_from "
                         f"{dt.datetime.fromtimestamp(instant, dt.UTC).isoformat()}")


def _first_in_force(index: dict[str, _Timeline[P]], names: tuple[str, ...], at: float) -> P | None:
    for name in names:
        timeline = index.get(name)
        price = timeline.at(at) if timeline else None
        if price is not None:
            return price
    return None


def _instant(value: object) -> float:
    """A TOML date or datetime (UTC unless it says otherwise) -> unix seconds."""
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    raise TypeError(f"effective_from must be a date or a date-time, got {value!r}")


def price_record(book: PriceBook, record: UsageRecord) -> UsageRecord:
    """The record with its cost to serve and list price, at the prices in force when it ended.

    Hardware classes and models without their own entry take the '*' entry's
    price. With no price at all the cost is 0 and a warning is logged: the
    record is still written (usage is never dropped), and its GPU-seconds
    still show in every report.
    """
    hardware = book.hardware_price(record.hardware_class, record.ended_at)
    if hardware is None and record.gpu_seconds:
        log.warning("price book %s has no price for hardware class %r; %s is recorded at cost 0",
                    book.version, record.hardware_class, record.request_id)
    model = book.model_price(record.model, record.ended_at)
    return dataclasses.replace(
        record, cost_nusd=hardware.cost_nusd(record.gpu_seconds) if hardware else 0,
        list_nusd=model.list_price_nusd(record.prompt_tokens, record.cached_tokens, record.completion_tokens)
        if model else 0,
        price_version=book.version)
