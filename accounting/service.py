"""The AccountingService: reports, budgets, limits, keys and chargeback exports over gRPC, scoped
by the caller's key (a tenant key sees its own team, an admin key all). Each RPC converts from
protobuf, calls the domain (accounting/admin.py for the admin RPCs, shared with the command line),
and converts back."""

from __future__ import annotations

import asyncio
import logging

import grpc
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from accounting.admin import Admin, BudgetStatus
from accounting.exports import Period, charge_rows, render
from accounting.ledger import Ledger
from accounting.reports import usage_report
from accounting.rollups import Totals
from fareway.accounting.v1 import accounting_pb2 as pb
from fareway.accounting.v1 import accounting_pb2_grpc
from fareway.auth import KeyInfo, KeyStore, Role, Tenant, require_admin
from fareway.config import RedisConfig
from fareway.errors import InvalidArgument, PermissionDenied, shown
from fareway.grpc_server import RunningServer, ServiceSpec, start_server
from fareway.process import stop_task, wait_for_shutdown_signal
from fareway.quota import LIMIT_FIELDS, Budgets, Limits
from fareway.redis import UNREACHABLE, connect
from fareway.redis.embedded import resolve_url

log = logging.getLogger(__name__)


class AccountingServicer(accounting_pb2_grpc.AccountingServiceServicer):
    def __init__(self, keys: KeyStore, ledger: Ledger, admin: Admin) -> None:
        self.keys = keys
        self.ledger = ledger
        self.admin = admin

    async def _teams(self, context: grpc.aio.ServicerContext, team: str) -> tuple[Tenant, list[str] | None]:
        """The caller, and the teams it may read: the one named (None: all) for admins, its own for tenants."""
        tenant = await self.keys.authenticate(context.invocation_metadata())
        if tenant.is_admin:
            return tenant, [team] if team else None
        if team and team != tenant.team:
            raise PermissionDenied(f"a tenant key of team {tenant.team!r} cannot read team {shown(team)}")
        return tenant, [tenant.team]

    async def _one_team(self, context: grpc.aio.ServicerContext, team: str, what: str) -> str:
        """The team a listing is of: the caller's own for a tenant key; an admin key names it."""
        _, teams = await self._teams(context, team)
        if teams is None:
            raise InvalidArgument(f"name the team whose {what} to list", field="team")
        return teams[0]

    async def _admin(self, context: grpc.aio.ServicerContext, action: str) -> None:
        require_admin(await self.keys.authenticate(context.invocation_metadata()), action)

    async def GetUsageReport(self, request: pb.GetUsageReportRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> pb.GetUsageReportResponse:
        _, teams = await self._teams(context, request.team)
        since = _instant(request.since, "since") if request.HasField("since") else None
        until = _instant(request.until, "until") if request.HasField("until") else None
        report = await usage_report(self.ledger, list(request.group_by), since=since, until=until, teams=teams,
                                    idle=request.idle or "none")
        return pb.GetUsageReportResponse(
            group_by=report.group_by,
            rows=[_row(group, totals) for group, totals in report.rows],
            total=_row((), report.total))

    async def SetBudget(self, request: pb.SetBudgetRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.SetBudgetResponse:
        await self._admin(context, "setting budgets")
        b = request.budget
        status = await self.admin.set_budget(b.team, b.project, b.hard_usd if b.HasField("hard_usd") else None,
                                             b.soft_usd if b.HasField("soft_usd") else None, b.basis)
        return pb.SetBudgetResponse(budget=_budget_pb(status))

    async def ListBudgets(self, request: pb.ListBudgetsRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.ListBudgetsResponse:
        team = await self._one_team(context, request.team, "budgets")
        return pb.ListBudgetsResponse(budgets=[_budget_pb(s) for s in await self.admin.list_budgets(team)])

    async def DeleteBudget(self, request: pb.DeleteBudgetRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.DeleteBudgetResponse:
        await self._admin(context, "deleting budgets")
        return pb.DeleteBudgetResponse(deleted=await self.admin.delete_budget(request.team, request.project))

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
        await self._admin(context, "setting limits")
        x = request.limits
        named = list(request.update_mask.paths) if request.HasField("update_mask") else [
            name for name in LIMIT_FIELDS if x.HasField(name)]
        if unknown := sorted(set(named) - set(LIMIT_FIELDS)):
            raise InvalidArgument(f"update_mask names {', '.join(unknown)}; the fields are {', '.join(LIMIT_FIELDS)}",
                                  field="update_mask")
        changes = {name: getattr(x, name) if x.HasField(name) else None for name in named}
        limits = await self.admin.set_limits(x.team, x.project, changes)
        return pb.SetLimitsResponse(limits=_limits_pb(limits))

    async def ListLimits(self, request: pb.ListLimitsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListLimitsResponse:
        team = await self._one_team(context, request.team, "limits")
        return pb.ListLimitsResponse(limits=[_limits_pb(x) for x in await self.admin.list_limits(team)])

    async def DeleteLimits(self, request: pb.DeleteLimitsRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.DeleteLimitsResponse:
        await self._admin(context, "deleting limits")
        return pb.DeleteLimitsResponse(deleted=await self.admin.delete_limits(request.team, request.project))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.CreateApiKeyResponse:
        await self._admin(context, "creating keys")
        if request.role not in (pb.KEY_ROLE_UNSPECIFIED, pb.KEY_ROLE_TENANT, pb.KEY_ROLE_ADMIN):
            raise InvalidArgument(f"role must be KEY_ROLE_TENANT or KEY_ROLE_ADMIN, got {request.role}", field="role")
        role = Role.ADMIN if request.role == pb.KEY_ROLE_ADMIN else Role.TENANT
        key, info = await self.admin.create_key(request.team, request.project, role)
        log.info("created %s key %s for %s/%s", role.value, info.key_id, info.team, info.project)
        return pb.CreateApiKeyResponse(key=key, info=_key_pb(info))

    async def ListApiKeys(self, request: pb.ListApiKeysRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.ListApiKeysResponse:
        await self._admin(context, "listing keys")
        return pb.ListApiKeysResponse(keys=[_key_pb(info) for info in await self.admin.list_keys()])

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.RevokeApiKeyResponse:
        await self._admin(context, "revoking keys")
        info = await self.admin.revoke_key(request.key_id)
        log.info("revoked key %s of %s/%s", info.key_id, info.team, info.project)
        return pb.RevokeApiKeyResponse(info=_key_pb(info))


def _budget_pb(status: BudgetStatus) -> pb.Budget:
    b = status.budget
    return pb.Budget(team=b.team, project=b.project, hard_usd=b.hard_usd, soft_usd=b.soft_usd, basis=b.basis,
                     spent_nano_usd=status.spent_nusd, reserved_nano_usd=status.reserved_nusd)


def _limits_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(team=limits.team, project=limits.project, **{
        name: value for name, value in limits.values().items() if value is not None})


def _row(group: tuple[str, ...], totals: Totals) -> pb.UsageRow:
    return pb.UsageRow(group=group, requests=totals.requests, prompt_tokens=totals.prompt_tokens,
                       cached_tokens=totals.cached_tokens, completion_tokens=totals.completion_tokens,
                       gpu_seconds=totals.gpu_seconds, cache_hit_rate=totals.cache_hit_rate,
                       cost_to_serve_nano_usd=totals.cost_nusd, list_price_nano_usd=totals.list_nusd,
                       idle_nano_usd=totals.idle_nusd)


async def create_accounting_server(redis: aioredis.Redis, address: str) -> RunningServer:
    servicer = AccountingServicer(KeyStore(redis), Ledger(redis), Admin(redis))
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


async def serve(listen: str, redis_config: RedisConfig, reservation_max_age_s: float) -> None:
    """Serves the AccountingService, and sweeps stale budget reservations, until SIGINT or SIGTERM."""
    with resolve_url(redis_config) as url:
        redis = connect(url)
        server = await create_accounting_server(redis, listen)
        sweeper = asyncio.create_task(sweep_stale_reservations(redis, reservation_max_age_s))
        log.info("accounting listening on port %d", server.port)
        try:
            await wait_for_shutdown_signal()
        finally:
            await stop_task(sweeper)
            await server.stop()
            await redis.aclose()


EARLIEST_S, LATEST_S = 0, 253_370_764_800
"""The instants a report's range may name: 1970-01-01 to 9999-01-01 (UTC)."""


def _instant(timestamp: timestamp_pb2.Timestamp, name: str) -> float:
    if not (EARLIEST_S <= timestamp.seconds < LATEST_S and 0 <= timestamp.nanos < 1_000_000_000):
        raise InvalidArgument(f"{name} must be a time from 1970-01-01 to 9999-01-01 (UTC), with nanos in "
                              f"[0, 1e9), got seconds={timestamp.seconds} nanos={timestamp.nanos}", field=name)
    return timestamp.seconds + timestamp.nanos / 1e9
