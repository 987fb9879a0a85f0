"""TLS and mutual TLS for Fareway's gRPC ports and the channels that call them.

A server given a certificate and key serves TLS; given a client CA as well it
requires every caller to present a certificate that CA signed (mutual TLS).
A channel given a CA verifies the server against it; given a certificate and
key as well it presents them. Files are PEM and are read once, at start.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    """The server's certificate chain (PEM)."""
    key_file: Path
    """Its private key (PEM)."""
    client_ca_file: Path | None = None
    """With it, callers must present a certificate this CA signed (mutual TLS)."""

    def credentials(self) -> grpc.ServerCredentials:
        root = _read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials([(_read(self.key_file), _read(self.cert_file))],
                                           root_certificates=root, require_client_auth=root is not None)


@dataclass(frozen=True)
class ChannelTls:
    ca_file: Path | None = None
    """The CA the server's certificate must chain to; None trusts the system's roots."""
    cert_file: Path | None = None
    """A client certificate to present (mutual TLS), with key_file."""
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            private_key=_read(self.key_file) if self.key_file else None,
            certificate_chain=_read(self.cert_file) if self.cert_file else None)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def add_server_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tls-cert", type=Path, default=None,
                        help=f"serve {what} over TLS with this certificate chain (PEM); needs --tls-key")
    parser.add_argument("--tls-key", type=Path, default=None, help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, default=None,
                        help="require callers to present a certificate signed by this CA (mutual TLS)")


def server_tls_from_args(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)


def add_channel_arguments(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    """--{prefix}tls-ca, --{prefix}tls-cert, --{prefix}tls-key for a channel to `what`."""
    parser.add_argument(f"--{prefix}tls-ca", type=Path, default=None,
                        help=f"call {what} over TLS, verifying its certificate against this CA (PEM)")
    parser.add_argument(f"--{prefix}tls-cert", type=Path, default=None,
                        help=f"a client certificate to present to {what} (mutual TLS); implies TLS")
    parser.add_argument(f"--{prefix}tls-key", type=Path, default=None, help="the private key of that certificate")


def channel_tls_from_args(args: argparse.Namespace, prefix: str) -> ChannelTls | None:
    attr = prefix.replace("-", "_")
    ca, cert, key = (getattr(args, f"{attr}tls_{name}") for name in ("ca", "cert", "key"))
    if ca is None and cert is None and key is None:
        return None
    return ChannelTls(ca, cert, key)


def secure_or_insecure_channel(address: str, tls: ChannelTls | None) -> grpc.Channel:
    return grpc.insecure_channel(address) if tls is None else grpc.secure_channel(address, tls.credentials())


def aio_channel(address: str, tls: ChannelTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.credentials())
