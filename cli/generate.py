"""`fareway generate`: one request through a gateway, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import grpc
from rich.console import Console

from cli.options import (
    add_connection_arguments,
    add_sampling_arguments,
    channel_tls_from_args,
    sampling_from_args,
    tags_from_args,
)
from cli.render import usage_table
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.tls import secure_or_insecure_channel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--system", default=None, help="a system message (implies --chat)")
    parser.add_argument("--request-id", default="", help="idempotency key")
    parser.add_argument("--session-id", default="",
                        help="requests with the same session id go to the same worker while it is up")
    parser.add_argument("prompt", help="the prompt text; '-' reads standard input")


class Connection:
    """A gateway channel and the caller's key."""

    def __init__(self, args: argparse.Namespace) -> None:
        if not args.api_key:
            raise SystemExit("no API key: pass --api-key or set FAREWAY_API_KEY (fareway keys create ...)")
        self.channel = secure_or_insecure_channel(args.gateway, channel_tls_from_args(args, ""))
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {args.api_key}"),)
        self.timeout = args.timeout
        self.model = args.model or self._first_model()

    def _first_model(self) -> str:
        models = self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=10).models
        if not models:
            raise SystemExit("the gateway serves no model yet")
        return models[0].id

    def stream(self, request: pb.GenerateStreamRequest) -> Iterator[pb.GenerateStreamResponse]:
        request.model = request.model or self.model
        return self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout)


def print_stream(responses: Iterator[pb.GenerateStreamResponse], console: Console) -> pb.GenerateStreamResponse:
    """Writes text as it arrives; returns the last message (finish reason and usage)."""
    last = pb.GenerateStreamResponse()
    for last in responses:
        sys.stdout.write(last.text)
        sys.stdout.flush()
    # Flushed too: what follows goes to stderr, and where both reach one pipe (`2>&1 | less`) it must
    # start on a line of its own.
    sys.stdout.write("\n")
    sys.stdout.flush()
    return last


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        conn = Connection(args)
        request = pb.GenerateStreamRequest(model=conn.model, sampling=sampling_from_args(args),
                                           request_id=args.request_id, session_id=args.session_id,
                                           tags=tags_from_args(args))
        if args.chat or args.system:
            messages = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
            messages.append(pb.ChatMessage(role="user", content=prompt))
            request.chat.messages.extend(messages)
        else:
            request.prompt = prompt
        last = print_stream(conn.stream(request), console)
    except grpc.RpcError as error:
        console.print(f"[red]error:[/red] {error.code().name}: {error.details()}")
        return 1
    console.print(usage_table(last.usage, last.finish_reason))
    return 0
