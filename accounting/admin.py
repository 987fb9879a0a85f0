"""Administration: API keys, rate limits and fair shares, budgets, and the price book.

The AccountingService's admin RPCs (accounting/service.py) and the `fareway keys | limits |
budget | prices` commands (cli/) both call these functions, so the two ways of managing Fareway
take the same rules and cannot disagree. Who may call them is the caller's business: the service
asks for an admin key, the command line for access to Redis.

Bad input raises InvalidArgument naming the field, as over gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from accounting.pricebook import PriceBook
from accounting.pricebook_store import PriceBookError, PriceBookStore
from fareway.auth import KeyInfo, KeyStore, Role, validate_name
from fareway.errors import InvalidArgument
from fareway.quota import LIMIT_FIELDS, Budget, Budgets, Limits, LimitStore, month_of, reserved_field, spend_field


@dataclass(frozen=True)
class BudgetStatus:
    """A budget and where its month stands."""

    budget: Budget
    month: str
    spent_nusd: int
    """This month's spend on the budget's basis."""
    reserved_nusd: int
    """What running requests hold against it."""


class Admin:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.keys = KeyStore(redis)
        self.limits = LimitStore(redis, cache_ttl_s=0)
        self.budgets = Budgets(redis)
        self.prices = PriceBookStore(redis)

    # --- API keys ----------------------------------------------------------------------------------

    async def create_key(self, team: str, project: str, role: Role = Role.TENANT) -> tuple[str, KeyInfo]:
        """A new key (returned only here; stored as a digest) and its info."""
        return await self.keys.create(team, project, role)

    async def list_keys(self) -> list[KeyInfo]:
        return await self.keys.list()

    async def revoke_key(self, key_id: str) -> KeyInfo:
        return await self.keys.revoke(key_id)

    # --- limits and fair shares --------------------------------------------------------------------

    async def set_limits(self, team: str, project: str, changes: Mapping[str, int | float | None]) -> Limits:
        """Changes the scope's limits: each name in `changes` (LIMIT_FIELDS) takes its value, or is
        cleared by None; the others stay as they were. Returns the limits now in force."""
        if not team:
            raise InvalidArgument("name the team whose limits to set", field="limits.team")
        _check_names(team, project)
        if not changes:
            raise InvalidArgument(f"nothing to change: give at least one of {', '.join(LIMIT_FIELDS)}", field="limits")
        try:
            return await self.limits.update(team, project, changes)
        except ValueError as error:
            raise InvalidArgument(str(error), field="limits") from None

    async def list_limits(self, team: str | None = None) -> list[Limits]:
        """One team's limits, or (None) every team's."""
        teams = [team] if team else await self.limits.teams()
        return [limits for name in teams for limits in await self.limits.list(name)]

    async def delete_limits(self, team: str, project: str = "") -> bool:
        if not team:
            raise InvalidArgument("name the team whose limits to delete", field="team")
        return await self.limits.delete(team, project)

    # --- budgets -----------------------------------------------------------------------------------

    async def set_budget(self, team: str, project: str, hard_usd: float | None, soft_usd: float | None,
                         basis: str = "list") -> BudgetStatus:
        """Sets the scope's monthly budget, replacing its earlier one."""
        if team:
            _check_names(team, project)
        try:
            budget = Budget(team, project, hard_usd, soft_usd, basis or "list")
        except ValueError as error:
            raise InvalidArgument(str(error), field="budget") from None
        await self.budgets.set(budget)
        return (await self._statuses([budget]))[0]

    async def list_budgets(self, team: str) -> list[BudgetStatus]:
        """A team's budgets, with this month's spend and what running requests hold."""
        if not team:
            raise InvalidArgument("name the team whose budgets to list", field="team")
        return await self._statuses(await self.budgets.list(team))

    async def delete_budget(self, team: str, project: str = "") -> bool:
        if not team:
            raise InvalidArgument("name the team whose budget to delete", field="team")
        return await self.budgets.delete(team, project)

    async def budget_alerts(self, team: str) -> list[dict[str, str]]:
        """The team's soft-budget crossings, oldest first."""
        return await self.budgets.alerts(team)

    async def _statuses(self, budgets: list[Budget]) -> list[BudgetStatus]:
        month = month_of(time.time())
        spend: dict[str, dict[str, int]] = {}
        statuses = []
        for b in budgets:
            if b.team not in spend:
                spend[b.team] = await self.budgets.spend(b.team, month)
            team_spend = spend[b.team]
            statuses.append(BudgetStatus(b, month, team_spend.get(spend_field(b.scope, b.basis), 0),
                                         team_spend.get(reserved_field(b.scope, b.basis), 0)))
        return statuses

    # --- prices ------------------------------------------------------------------------------------

    async def load_prices(self, book: PriceBook) -> None:
        """Makes `book` the price book in force; refused if it would reprice usage already recorded."""
        try:
            await self.prices.load(book)
        except PriceBookError as error:
            raise InvalidArgument(str(error), field="price_book") from None

    async def prices_in_force(self) -> PriceBook:
        """The price book in force (the default one, loaded first, if none is)."""
        return await self.prices.ensure()



def _check_names(team: str, project: str) -> None:
    """The names a limit or budget is stored under are the names keys are created for."""
    validate_name("team", team)
    if project:
        validate_name("project", project)
