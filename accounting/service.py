"""The AccountingService: usage reports over gRPC, scoped by the caller's key."""

from __future__ import annotations

import grpc
import redis.asyncio as aioredis

from accounting.ledger import Ledger
from accounting.reports import usage_report
from accounting.rollups import Totals
from fareway.accounting.v1 import accounting_pb2 as pb
from fareway.accounting.v1 import accounting_pb2_grpc
from fareway.auth import KeyStore
from fareway.errors import PermissionDenied
from fareway.grpc_server import RunningServer, ServiceSpec, start_server


class AccountingServicer(accounting_pb2_grpc.AccountingServiceServicer):
    def __init__(self, keys: KeyStore, ledger: Ledger) -> None:
        self.keys = keys
        self.ledger = ledger

    async def GetUsageReport(self, request: pb.GetUsageReportRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> pb.GetUsageReportResponse:
        tenant = await self.keys.authenticate(context.invocation_metadata())
        if tenant.is_admin:
            teams = [request.team] if request.team else None
        elif request.team and request.team != tenant.team:
            raise PermissionDenied(f"a tenant key of team {tenant.team!r} cannot read team {request.team!r}")
        else:
            teams = [tenant.team]
        since = request.since.ToMicroseconds() / 1e6 if request.HasField("since") else None
        until = request.until.ToMicroseconds() / 1e6 if request.HasField("until") else None
        report = await usage_report(self.ledger, list(request.group_by), since=since, until=until, teams=teams,
                                    idle=request.idle or "none")
        return pb.GetUsageReportResponse(
            group_by=report.group_by,
            rows=[_row(group, totals) for group, totals in report.rows],
            total=_row((), report.total))


def _row(group: tuple[str, ...], totals: Totals) -> pb.UsageRow:
    return pb.UsageRow(group=group, requests=totals.requests, prompt_tokens=totals.prompt_tokens,
                       cached_tokens=totals.cached_tokens, completion_tokens=totals.completion_tokens,
                       gpu_seconds=totals.gpu_seconds, cache_hit_rate=totals.cache_hit_rate,
                       cost_to_serve_nano_usd=totals.cost_nusd, list_price_nano_usd=totals.list_nusd,
                       idle_nano_usd=totals.idle_nusd)


async def create_accounting_server(redis: aioredis.Redis, address: str) -> RunningServer:
    servicer = AccountingServicer(KeyStore(redis), Ledger(redis))
    return await start_server(address, [ServiceSpec(
        pb.DESCRIPTOR.services_by_name["AccountingService"].full_name,
        lambda server: accounting_pb2_grpc.add_AccountingServiceServicer_to_server(servicer, server))])
