"""TLS and mutual TLS for Fareway's gRPC ports (and the gateway's HTTP edge) and the channels that call them.

A server given a certificate and key serves TLS; given a client CA as well it
requires every caller to present a certificate that CA signed (mutual TLS).
A channel given a CA verifies the server against it; given a certificate and
key as well it presents them. Files are PEM and are read once, at start.
"""

from __future__ import annotations

import ssl
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

    def ssl_context(self) -> ssl.SSLContext:
        """The same for an HTTP server (the gateway's OpenAI-compatible edge)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file:
                context.load_verify_locations(self.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS files {self.cert_file}, {self.key_file}: {exc}") from None
        return context


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


def secure_or_insecure_channel(address: str, tls: ChannelTls | None) -> grpc.Channel:
    return grpc.insecure_channel(address) if tls is None else grpc.secure_channel(address, tls.credentials())


def aio_channel(address: str, tls: ChannelTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.credentials())
