"""The AccountingService over gRPC: tenants see their own team, admins see all."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2

from fareway.accounting.v1 import accounting_pb2 as pb
from fareway.accounting.v1 import accounting_pb2_grpc
from fareway.errors import status_details
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.inference.v1 import inference_pb2_grpc

pytestmark = pytest.mark.slow


def usage_for(stack, team: str, requests: int) -> str:  # noqa: ANN001
    key = stack.create_key(team, "app")
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(requests):
            stub.Generate(ipb.GenerateRequest(model="smollm2-135m-instruct", prompt="Hi",
                                              sampling=ipb.SamplingParams(max_tokens=2, temperature=0)),
                          metadata=(("authorization", f"Bearer {key}"),))
    return key


def report(stack, key: str, **fields) -> pb.GetUsageReportResponse:  # noqa: ANN001, ANN003
    with grpc.insecure_channel(stack.accounting_address) as channel:
        return accounting_pb2_grpc.AccountingServiceStub(channel).GetUsageReport(
            pb.GetUsageReportRequest(**fields), metadata=(("authorization", f"Bearer {key}"),))


def test_tenants_see_their_team_and_admins_see_every_team(stack) -> None:  # noqa: ANN001
    ours, theirs = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    key = usage_for(stack, ours, 2)
    usage_for(stack, theirs, 1)
    admin = stack.create_key("platform", "ops", admin=True)

    own = report(stack, key, group_by=["team", "model"])
    assert [(list(r.group), r.requests) for r in own.rows] == [([ours, "smollm2-135m-instruct"], 2)]
    assert own.total.requests == 2 and own.total.completion_tokens == 4 and own.total.gpu_seconds > 0

    everyone = report(stack, admin, group_by=["team"])
    teams = {r.group[0]: r.requests for r in everyone.rows}
    assert teams[ours] == 2 and teams[theirs] == 1
    assert [r.requests for r in report(stack, admin, group_by=["team"], team=theirs).rows] == [1]

    with pytest.raises(grpc.RpcError) as caught:
        report(stack, key, group_by=["team"], team=theirs)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_bad_queries_and_keys_are_refused(stack) -> None:  # noqa: ANN001
    key = stack.create_key(f"c-{uuid.uuid4().hex[:6]}")
    with pytest.raises(grpc.RpcError) as bad_group:
        report(stack, key, group_by=["colour"])
    assert bad_group.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as no_key:
        report(stack, "fw_unknown_key", group_by=["team"])
    assert no_key.value.code() is grpc.StatusCode.UNAUTHENTICATED


def accounting(stack):  # noqa: ANN001, ANN201
    return accounting_pb2_grpc.AccountingServiceStub(grpc.insecure_channel(stack.accounting_address))


def test_a_hard_budget_set_by_an_admin_stops_the_gateway(stack) -> None:  # noqa: ANN001
    team = f"d-{uuid.uuid4().hex[:6]}"
    key = usage_for(stack, team, 1)
    admin = stack.create_key("platform", "ops", admin=True)
    stub, tenant_auth = accounting(stack), (("authorization", f"Bearer {key}"),)
    with pytest.raises(grpc.RpcError) as tenant_sets:
        stub.SetBudget(pb.SetBudgetRequest(budget=pb.Budget(team=team, hard_usd=100)), metadata=tenant_auth)
    assert tenant_sets.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as bad:
        stub.SetBudget(pb.SetBudgetRequest(budget=pb.Budget(team=team, hard_usd=1, basis="vibes")),
                       metadata=(("authorization", f"Bearer {admin}"),))
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # A hard budget below what has been spent already: the next request is refused, naming the budget.
    set_ = stub.SetBudget(pb.SetBudgetRequest(budget=pb.Budget(team=team, hard_usd=1e-9, basis="list")),
                          metadata=(("authorization", f"Bearer {admin}"),))
    assert set_.budget.spent_nano_usd > 0
    with pytest.raises(grpc.RpcError) as refused:
        usage_for(stack, team, 1)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"monthly list budget of team {team}" in refused.value.details()
    [quota] = [d for d in status_details(refused.value) if isinstance(d, error_details_pb2.QuotaFailure)]
    assert quota.violations[0].subject == f"budget:{team}"
    listed = stub.ListBudgets(pb.ListBudgetsRequest(), metadata=tenant_auth).budgets
    assert [(b.team, b.hard_usd, b.reserved_nano_usd) for b in listed] == [(team, 1e-9, 0)]
    # Refused requests leave no usage record and hold nothing.
    assert len(stack.records(team)) == 1

    with pytest.raises(grpc.RpcError) as tenant_deletes:
        stub.DeleteBudget(pb.DeleteBudgetRequest(team=team), metadata=tenant_auth)
    assert tenant_deletes.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "needs an admin key" in tenant_deletes.value.details()
    admin_auth = (("authorization", f"Bearer {admin}"),)
    assert stub.DeleteBudget(pb.DeleteBudgetRequest(team=team), metadata=admin_auth).deleted
    assert not stub.DeleteBudget(pb.DeleteBudgetRequest(team=team), metadata=admin_auth).deleted
    assert list(stub.ListBudgets(pb.ListBudgetsRequest(), metadata=tenant_auth).budgets) == []
    usage_for_key(stack, key)  # no budget: served again
    assert len(stack.records(team)) == 2


def test_a_tenant_exports_only_its_own_team(stack) -> None:  # noqa: ANN001
    ours = f"e-{uuid.uuid4().hex[:6]}"
    key = usage_for(stack, ours, 1)
    usage_for(stack, f"f-{uuid.uuid4().hex[:6]}", 1)
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    exported = accounting(stack).ExportChargeback(pb.ExportChargebackRequest(period=month, format="focus"),
                                                  metadata=(("authorization", f"Bearer {key}"),))
    rows = list(csv.DictReader(io.StringIO(exported.content)))
    assert rows and {r["SubAccountId"] for r in rows} == {ours}
    with pytest.raises(grpc.RpcError) as bad:
        accounting(stack).ExportChargeback(pb.ExportChargebackRequest(period="soon"),
                                           metadata=(("authorization", f"Bearer {key}"),))
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_rate_limits_set_by_an_admin_apply_at_the_gateway(stack) -> None:  # noqa: ANN001
    team = f"l-{uuid.uuid4().hex[:6]}"
    key = stack.create_key(team, "app")
    admin = stack.create_key("platform", "ops", admin=True)
    stub, tenant_auth = accounting(stack), (("authorization", f"Bearer {key}"),)
    admin_auth = (("authorization", f"Bearer {admin}"),)
    with pytest.raises(grpc.RpcError) as tenant_sets:
        stub.SetLimits(pb.SetLimitsRequest(limits=pb.Limits(team=team, requests_per_minute=100)),
                       metadata=tenant_auth)
    assert tenant_sets.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as none_set:
        stub.SetLimits(pb.SetLimitsRequest(limits=pb.Limits(team=team)), metadata=admin_auth)
    assert none_set.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    set_ = stub.SetLimits(pb.SetLimitsRequest(limits=pb.Limits(team=team, project="app", requests_per_minute=1)),
                          metadata=admin_auth)
    assert (set_.limits.requests_per_minute, set_.limits.HasField("tokens_per_minute")) == (1, False)
    usage_for_key(stack, key)
    with pytest.raises(grpc.RpcError) as refused:
        usage_for_key(stack, key)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    [quota] = [d for d in status_details(refused.value) if isinstance(d, error_details_pb2.QuotaFailure)]
    assert quota.violations[0].subject == f"project:{team}/app"
    listed = stub.ListLimits(pb.ListLimitsRequest(team="someone-else"), metadata=admin_auth).limits
    assert list(listed) == []
    with pytest.raises(grpc.RpcError) as other_team:
        stub.ListLimits(pb.ListLimitsRequest(team="someone-else"), metadata=tenant_auth)
    assert other_team.value.code() is grpc.StatusCode.PERMISSION_DENIED
    [mine] = stub.ListLimits(pb.ListLimitsRequest(), metadata=tenant_auth).limits
    assert (mine.project, mine.requests_per_minute) == ("app", 1)
    assert stub.DeleteLimits(pb.DeleteLimitsRequest(team=team, project="app"), metadata=admin_auth).deleted
    assert not stub.DeleteLimits(pb.DeleteLimitsRequest(team=team, project="app"), metadata=admin_auth).deleted


def usage_for_key(stack, key: str) -> None:  # noqa: ANN001
    with grpc.insecure_channel(stack.gateway_address) as channel:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            ipb.GenerateRequest(model="smollm2-135m-instruct", prompt="Hi",
                                sampling=ipb.SamplingParams(max_tokens=1, temperature=0)),
            metadata=(("authorization", f"Bearer {key}"),))


def test_admin_keys_manage_keys_tenant_keys_cannot_and_no_key_is_ever_logged(stack, caplog) -> None:  # noqa: ANN001
    import logging
    caplog.set_level(logging.DEBUG)
    team = f"k-{uuid.uuid4().hex[:6]}"
    admin = stack.create_key("platform", "ops", admin=True)
    tenant = stack.create_key(team, "app")
    stub = accounting(stack)
    admin_auth, tenant_auth = (("authorization", f"Bearer {admin}"),), (("authorization", f"Bearer {tenant}"),)
    for call, request in ((stub.CreateApiKey, pb.CreateApiKeyRequest(team=team, project="app")),
                          (stub.ListApiKeys, pb.ListApiKeysRequest()),
                          (stub.RevokeApiKey, pb.RevokeApiKeyRequest(key_id="whatever"))):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, metadata=tenant_auth)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED

    created = stub.CreateApiKey(pb.CreateApiKeyRequest(team=team, project="batch"), metadata=admin_auth)
    assert (created.info.team, created.info.project, created.info.role) == (team, "batch", pb.KEY_ROLE_TENANT)
    usage_for_key(stack, created.key)                       # the new key generates
    assert [list(r.group) for r in report(stack, created.key, group_by=["team"]).rows] == [[team]]
    listed = {k.key_id: k for k in stub.ListApiKeys(pb.ListApiKeysRequest(), metadata=admin_auth).keys}
    assert created.info.key_id in listed and not listed[created.info.key_id].HasField("revoked_at")
    revoked = stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=created.info.key_id), metadata=admin_auth)
    assert revoked.info.HasField("revoked_at")
    with pytest.raises(grpc.RpcError) as gone:
        report(stack, created.key)
    assert gone.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as unknown:
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id="nope"), metadata=admin_auth)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert all(key not in caplog.text for key in (admin, tenant, created.key))
