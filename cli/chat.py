"""`fareway chat`: a conversation with a model through a gateway."""

from __future__ import annotations

import argparse

import grpc
from rich.console import Console

from cli.generate import Connection, print_stream
from cli.options import add_connection_arguments, add_sampling_arguments, sampling_from_args, tags_from_args
from fareway.inference.v1 import inference_pb2 as pb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--message", action="append", default=None,
                        help="send these user messages in turn, then exit (default: read them interactively)")
    parser.add_argument("--show-usage", action="store_true", help="print the usage of every reply")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        conn = Connection(args)
    except grpc.RpcError as error:
        console.print(f"[red]error:[/red] {error.code().name}: {error.details()}")
        return 1
    history = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
    scripted = args.message is not None
    if not scripted:
        console.print(f"chatting with {conn.model}; an empty line or Ctrl-D ends", highlight=False)
    for user in _user_messages(args.message, console):
        history.append(pb.ChatMessage(role="user", content=user))
        request = pb.GenerateStreamRequest(model=conn.model, sampling=sampling_from_args(args),
                                           tags=tags_from_args(args))
        request.chat.messages.extend(history)
        try:
            last, reply = _reply(conn, request, console)
        except grpc.RpcError as error:
            console.print(f"[red]error:[/red] {error.code().name}: {error.details()}")
            history.pop()
            if scripted:
                return 1
            continue
        history.append(pb.ChatMessage(role="assistant", content=reply))
        if args.show_usage:
            from cli.render import usage_table
            console.print(usage_table(last.usage, last.finish_reason))
    return 0


def _user_messages(scripted: list[str] | None, console: Console):  # noqa: ANN202 - Iterator[str]
    if scripted is not None:
        yield from scripted
        return
    while True:
        try:
            line = console.input("[bold]you>[/bold] ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def _reply(conn: Connection, request: pb.GenerateStreamRequest,
           console: Console) -> tuple[pb.GenerateStreamResponse, str]:
    texts: list[str] = []

    def collect():  # noqa: ANN202
        for response in conn.stream(request):
            texts.append(response.text)
            yield response

    last = print_stream(collect(), console)
    return last, "".join(texts)
