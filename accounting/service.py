"""The AccountingService: reports, budgets and chargeback exports over gRPC,
scoped by the caller's key (a tenant key sees its own team, an admin key all)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import redis.asyncio as aioredis

from accounting.exports import Period, charge_rows, render
from accounting.ledger import Ledger
from accounting.reports import usage_report
from accounting.rollups import Totals
from fareway.accounting.v1 import accounting_pb2 as pb
from fareway.accounting.v1 import accounting_pb2_grpc
from fareway.auth import KeyInfo, KeyStore, Role, Tenant
from fareway.errors import InvalidArgument, PermissionDenied
from fareway.grpc_server import RunningServer, ServiceSpec, start_server
from fareway.quota import Budget, Budgets, Limits, LimitStore, month_of
from fareway.redis import UNREACHABLE

log = logging.getLogger(__name__)


class AccountingServicer(accounting_pb2_grpc.AccountingServiceServicer):
    def __init__(self, keys: KeyStore, ledger: Ledger, budgets: Budgets, limits: LimitStore) -> None:
        self.keys = keys
        self.ledger = ledger
        self.budgets = budgets
        self.limits = limits

    async def _teams(self, context: grpc.aio.ServicerContext, team: str) -> tuple[Tenant, list[str] | None]:
        """The caller, and the teams it may read: the one named (None: all) for admins, its own for tenants."""
        tenant = await self.keys.authenticate(context.invocation_metadata())
        if tenant.is_admin:
            return tenant, [team] if team else None
        if team and team != tenant.team:
            raise PermissionDenied(f"a tenant key of team {tenant.team!r} cannot read team {team!r}")
        return tenant, [tenant.team]

    async def GetUsageReport(self, request: pb.GetUsageReportRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> pb.GetUsageReportResponse:
        _, teams = await self._teams(context, request.team)
        since = request.since.ToMicroseconds() / 1e6 if request.HasField("since") else None
        until = request.until.ToMicroseconds() / 1e6 if request.HasField("until") else None
        report = await usage_report(self.ledger, list(request.group_by), since=since, until=until, teams=teams,
                                    idle=request.idle or "none")
        return pb.GetUsageReportResponse(
            group_by=report.group_by,
            rows=[_row(group, totals) for group, totals in report.rows],
            total=_row((), report.total))


    async def SetBudget(self, request: pb.SetBudgetRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.SetBudgetResponse:
        tenant = await self.keys.authenticate(context.invocation_metadata())
        if not tenant.is_admin:
            raise PermissionDenied("only admin keys can set budgets")
        b = request.budget
        try:
            budget = Budget(b.team, b.project, b.hard_usd if b.HasField("hard_usd") else None,
                            b.soft_usd if b.HasField("soft_usd") else None, b.basis or "list")
        except ValueError as error:
            raise InvalidArgument(str(error), field="budget") from None
        await self.budgets.set(budget)
        return pb.SetBudgetResponse(budget=await self._budget_pb(budget))

    async def ListBudgets(self, request: pb.ListBudgetsRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.ListBudgetsResponse:
        _, teams = await self._teams(context, request.team)
        if teams is None:
            raise InvalidArgument("name the team whose budgets to list", field="team")
        return pb.ListBudgetsResponse(budgets=[await self._budget_pb(b) for b in await self.budgets.list(teams[0])])

    async def ExportChargeback(self, request: pb.ExportChargebackRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> pb.ExportChargebackResponse:
        _, teams = await self._teams(context, "")
        period = Period.parse(request.period)
        fmt = request.format or "csv"
        rows = await charge_rows(self.ledger, period, teams=teams)
        return pb.ExportChargebackResponse(content=render(rows, period, fmt),
                                           content_type="application/jsonl" if fmt == "jsonl" else "text/csv")

    async def SetLimits(self, request: pb.SetLimitsRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.SetLimitsResponse:
        await self._admin(context, "set limits")
        x = request.limits
        try:
            limits = Limits(x.team, x.project, *(getattr(x, name) if x.HasField(name) else None
                                                 for name in _LIMIT_FIELDS))
        except ValueError as error:
            raise InvalidArgument(str(error), field="limits") from None
        await self.limits.set(limits)
        return pb.SetLimitsResponse(limits=_limits_pb(limits))

    async def ListLimits(self, request: pb.ListLimitsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListLimitsResponse:
        _, teams = await self._teams(context, request.team)
        if teams is None:
            raise InvalidArgument("name the team whose limits to list", field="team")
        return pb.ListLimitsResponse(limits=[_limits_pb(x) for x in await self.limits.list(teams[0])])

    async def DeleteLimits(self, request: pb.DeleteLimitsRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.DeleteLimitsResponse:
        await self._admin(context, "delete limits")
        if not request.team:
            raise InvalidArgument("name the team whose limits to delete", field="team")
        return pb.DeleteLimitsResponse(deleted=await self.limits.delete(request.team, request.project))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.CreateApiKeyResponse:
        await self._admin(context, "create keys")
        role = Role.ADMIN if request.role == pb.KEY_ROLE_ADMIN else Role.TENANT
        key, info = await self.keys.create(request.team, request.project, role)
        log.info("created %s key %s for %s/%s", role.value, info.key_id, info.team, info.project)
        return pb.CreateApiKeyResponse(key=key, info=_key_pb(info))

    async def ListApiKeys(self, request: pb.ListApiKeysRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.ListApiKeysResponse:
        await self._admin(context, "list keys")
        return pb.ListApiKeysResponse(keys=[_key_pb(info) for info in await self.keys.list()])

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.RevokeApiKeyResponse:
        await self._admin(context, "revoke keys")
        info = await self.keys.revoke(request.key_id)
        log.info("revoked key %s of %s/%s", info.key_id, info.team, info.project)
        return pb.RevokeApiKeyResponse(info=_key_pb(info))

    async def _admin(self, context: grpc.aio.ServicerContext, action: str) -> None:
        tenant = await self.keys.authenticate(context.invocation_metadata())
        if not tenant.is_admin:
            raise PermissionDenied(f"only admin keys can {action}")

    async def _budget_pb(self, budget: Budget) -> pb.Budget:
        spend = await self.budgets.spend(budget.team, month_of(time.time()))
        return pb.Budget(team=budget.team, project=budget.project, hard_usd=budget.hard_usd,
                         soft_usd=budget.soft_usd, basis=budget.basis,
                         spent_nano_usd=spend.get(f"{budget.scope}:{budget.basis}", 0),
                         reserved_nano_usd=spend.get(f"{budget.scope}:reserved_{budget.basis}", 0))


_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")


def _limits_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(team=limits.team, project=limits.project, requests_per_minute=limits.requests_per_minute,
                     tokens_per_minute=limits.tokens_per_minute,
                     max_concurrent_requests=limits.max_concurrent_requests)


def _row(group: tuple[str, ...], totals: Totals) -> pb.UsageRow:
    return pb.UsageRow(group=group, requests=totals.requests, prompt_tokens=totals.prompt_tokens,
                       cached_tokens=totals.cached_tokens, completion_tokens=totals.completion_tokens,
                       gpu_seconds=totals.gpu_seconds, cache_hit_rate=totals.cache_hit_rate,
                       cost_to_serve_nano_usd=totals.cost_nusd, list_price_nano_usd=totals.list_nusd,
                       idle_nano_usd=totals.idle_nusd)


async def create_accounting_server(redis: aioredis.Redis, address: str) -> RunningServer:
    servicer = AccountingServicer(KeyStore(redis), Ledger(redis), Budgets(redis), LimitStore(redis))
    return await start_server(address, [ServiceSpec(
        pb.DESCRIPTOR.services_by_name["AccountingService"].full_name,
        lambda server: accounting_pb2_grpc.add_AccountingServiceServicer_to_server(servicer, server))])


SWEEP_INTERVAL_S = 60.0


async def sweep_stale_reservations(redis: aioredis.Redis, max_age_s: float,
                                   interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Forever: releases budget reservations whose gateway died before recording their request."""
    budgets, ledger = Budgets(redis), Ledger(redis)
    while True:
        try:
            for team in await ledger.teams():
                released = await budgets.release_stale(team, max_age_s)
                if released:
                    log.warning("released %d stale budget reservations of team %s", released, team)
        except UNREACHABLE as exc:
            log.info("stale reservation sweep waits for Redis: %s", exc)
        except Exception:  # noqa: BLE001 - one bad sweep must not end the sweeps for good
            log.exception("stale reservation sweep failed (retried in %.0f s)", interval_s)
        await asyncio.sleep(interval_s)


def _key_pb(info: KeyInfo) -> pb.ApiKeyInfo:
    key = pb.ApiKeyInfo(key_id=info.key_id, team=info.team, project=info.project,
                        role=pb.KEY_ROLE_ADMIN if info.role is Role.ADMIN else pb.KEY_ROLE_TENANT)
    key.created_at.FromNanoseconds(int(info.created_at * 1e9))
    if info.revoked_at is not None:
        key.revoked_at.FromNanoseconds(int(info.revoked_at * 1e9))
    return key
