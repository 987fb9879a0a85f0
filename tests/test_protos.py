"""The wire contract: committed generated code is current, and every RPC has a handler."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from accounting.service import AccountingServicer
from fareway.accounting.v1 import accounting_pb2
from fareway.inference.v1 import inference_pb2
from fareway.worker.v1 import worker_pb2
from gateway.service import InferenceServicer

ROOT = Path(__file__).resolve().parent.parent


def _generator():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    gen = _generator()
    gen.generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    stale = [str(p) for p in generated if (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"regenerate with `make protos`: {stale}"


def _servicers():  # noqa: ANN202
    from workers.server import WorkerServicer
    return [
        (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"], InferenceServicer),
        (worker_pb2.DESCRIPTOR.services_by_name["WorkerService"], WorkerServicer),
        (accounting_pb2.DESCRIPTOR.services_by_name["AccountingService"], AccountingServicer),
    ]


@pytest.mark.parametrize(("service", "servicer"), _servicers(), ids=lambda v: getattr(v, "name", ""))
def test_every_rpc_has_a_handler(service, servicer) -> None:  # noqa: ANN001
    base = servicer.__mro__[1]  # the generated *Servicer base, whose methods answer UNIMPLEMENTED
    for method in service.methods:
        assert getattr(servicer, method.name) is not getattr(base, method.name), f"{method.name} is unimplemented"


def test_generate_and_generate_stream_requests_stay_alike() -> None:
    fields = lambda m: [(f.name, f.number, f.type) for f in m.DESCRIPTOR.fields]  # noqa: E731
    assert fields(inference_pb2.GenerateRequest) == fields(inference_pb2.GenerateStreamRequest)


def test_enum_zero_values_are_unspecified() -> None:
    for module in (inference_pb2, worker_pb2, accounting_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED")
