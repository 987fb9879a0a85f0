"""Flags and values more than one command takes: TLS, the gateway connection, sampling, sizes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fareway.inference.v1 import inference_pb2 as pb
from fareway.tls import ChannelTls, ServerTls


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


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=os.environ.get("FAREWAY_GATEWAY", "127.0.0.1:50051"),
                        help="gateway address (default: $FAREWAY_GATEWAY or %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("FAREWAY_API_KEY"),
                        help="API key (default: $FAREWAY_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the first the gateway lists)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    add_channel_arguments(parser, "", "the gateway")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string; repeat for several")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="a cost-attribution tag; repeat for several")


def sampling_from_args(args: argparse.Namespace) -> pb.SamplingParams:
    params = pb.SamplingParams(top_k=args.top_k, stop=args.stop)
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    return params


def tags_from_args(args: argparse.Namespace) -> dict[str, str]:
    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--tag takes KEY=VALUE, got {item!r}")
        tags[key] = value
    return tags


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '2GB', '1073741824' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    value = text.strip().lower()
    for suffix, factor in units.items():
        if value.endswith(suffix):
            number = value[: -len(suffix)].strip()
            break
    else:
        number, factor = value, 1
    try:
        result = int(float(number) * factor)
    except (ValueError, OverflowError):  # OverflowError: 'inf', '1e400'
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GiB or a number of bytes)") from None
    if result <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return result
