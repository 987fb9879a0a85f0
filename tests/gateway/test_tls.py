"""TLS on the public port and mutual TLS on both ports, with certificates made
for the test by a throw-away CA."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.tls import ChannelTls, ServerTls, secure_or_insecure_channel
from tests.gateway.fleet import gateway as fleet_gateway
from workers.config import RunnerConfig, WorkerConfig
from workers.server import create_worker_server
from workers.worker import Worker


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate from another CA."""
    stranger_key: Path


def _key_and_name(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    return ec.generate_private_key(ec.SECP256R1()), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, is_ca: bool,  # noqa: ANN001
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> tuple[Path, Path]:  # noqa: ANN001
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca_name = _key_and_name("Fareway test CA")
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, is_ca=True)
    ca_file, _ = _write(folder / "ca", ca, ca_key)
    files = {}
    for name, server in (("server", True), ("client", False)):
        key, subject = _key_and_name(f"fareway-{name}")
        files[name] = _write(folder / name, _certificate(subject, key, ca_name, ca_key, is_ca=False, server=server), key)
    other_key, other_name = _key_and_name("another CA")
    key, subject = _key_and_name("stranger")
    files["stranger"] = _write(folder / "stranger",
                               _certificate(subject, key, other_name, other_key, is_ca=False), key)
    return Pki(ca_file, *files["server"], *files["client"], *files["stranger"])


@contextlib.contextmanager
def worker_serving(background_loop, checkpoint, tls: ServerTls | None) -> Iterator[str]:  # noqa: ANN001
    worker = Worker(WorkerConfig(worker_id="tls-worker",
                                 runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20)), checkpoint)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0", tls.credentials() if tls else None))
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        background_loop.run(server.stop(0))
        worker.stop()


def generate(address: str, key: str, tls: ChannelTls | None) -> pb.GenerateResponse:
    with secure_or_insecure_channel(address, tls) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        return stub.Generate(pb.GenerateRequest(model="tiny-llama", prompt="hello",
                                                sampling=pb.SamplingParams(max_tokens=2, temperature=0)),
                             metadata=(("authorization", f"Bearer {key}"),), timeout=10)


def test_mutual_tls_on_both_ports(stack, background_loop, tiny_checkpoint, pki: Pki) -> None:  # noqa: ANN001
    """The gateway serves TLS and requires client certificates from its CA; the worker requires
    the gateway's. Plaintext, an unknown CA's certificate or none at all are refused."""
    key = stack.create_key(f"t-{uuid.uuid4().hex[:6]}")
    mtls = ServerTls(pki.server_cert, pki.server_key, client_ca_file=pki.ca)
    client = ChannelTls(pki.ca, pki.client_cert, pki.client_key)
    with worker_serving(background_loop, tiny_checkpoint, mtls) as worker:
        with fleet_gateway(background_loop, stack.redis_url, (worker,), tls=mtls, worker_tls=client) as gateway:
            deadline = time.monotonic() + 10
            while True:  # the pool's first refresh
                try:
                    response = generate(gateway, key, client)
                    break
                except grpc.RpcError as error:
                    if error.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert response.usage.worker_id == "tls-worker" and response.usage.completion_tokens == 2
            for tls in (None, ChannelTls(pki.ca), ChannelTls(pki.ca, pki.stranger_cert, pki.stranger_key)):
                with pytest.raises(grpc.RpcError) as refused:
                    generate(gateway, key, tls)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        # A gateway without a client certificate cannot use the worker: no worker, UNAVAILABLE.
        with fleet_gateway(background_loop, stack.redis_url, (worker,), worker_tls=ChannelTls(pki.ca)) as gateway:
            with pytest.raises(grpc.RpcError) as refused:
                generate(gateway, key, None)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates(stack, background_loop, tiny_checkpoint, pki: Pki) -> None:  # noqa: ANN001
    key = stack.create_key(f"t-{uuid.uuid4().hex[:6]}")
    with worker_serving(background_loop, tiny_checkpoint, None) as worker:
        with fleet_gateway(background_loop, stack.redis_url, (worker,),
                           tls=ServerTls(pki.server_cert, pki.server_key)) as gateway:
            assert generate(gateway, key, ChannelTls(pki.ca)).usage.completion_tokens == 2
            with pytest.raises(grpc.RpcError):
                generate(gateway, key, None)


def test_tls_flags_go_together() -> None:
    import argparse

    from cli.options import add_server_arguments, server_tls_from_args
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, "it")
    assert server_tls_from_args(parser.parse_args([])) is None
    for argv in (["--tls-cert", "c.pem"], ["--tls-client-ca", "ca.pem"]):
        with pytest.raises(ValueError, match="--tls"):
            server_tls_from_args(parser.parse_args(argv))
    with pytest.raises(ValueError, match="key"):
        ChannelTls(cert_file=Path("c.pem"))
