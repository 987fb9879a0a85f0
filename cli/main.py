"""The `fareway` command. Each subcommand is a module of this package with `add_arguments(parser)`
and `run(args) -> int`, imported only when it is the one chosen (so `fareway keys` never loads
torch, and `fareway --help` loads no subcommand at all)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fareway.errors import FarewayError
from fareway.redis import UNREACHABLE

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("cli.up", "run the whole stack (Redis, worker, accounting, gateway) and a demo request"),
    "worker": ("cli.worker", "serve a model on this machine's devices (the WorkerService)"),
    "gateway": ("cli.gateway", "serve the public InferenceService in front of workers"),
    "accounting": ("cli.accounting", "serve usage reports (the AccountingService)"),
    "keys": ("cli.keys", "create, list or revoke API keys"),
    "generate": ("cli.generate", "send one generation request to a gateway"),
    "chat": ("cli.chat", "chat with a model through a gateway"),
    "report": ("cli.report", "print usage and cost per team, project, model, ..."),
    "export": ("cli.export", "a month's chargeback as CSV, JSON Lines or FinOps FOCUS"),
    "reconcile": ("cli.reconcile", "check that ledger, rollups and export agree for a month"),
    "budget": ("cli.budget", "set, list or delete monthly team and project budgets"),
    "limits": ("cli.limits", "set, list or delete requests, tokens per minute and concurrency limits"),
    "prices": ("cli.prices", "load a price book version, or show the prices in force"),
    "plan": ("cli.plan", "size a model on a hardware class: weights, KV cache, conversations, cost"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with the flags of the command `argv` names (only that command's module is imported;
    build_parser() alone lists every command without importing any)."""
    parser = argparse.ArgumentParser(prog="fareway", description="A gRPC inference gateway with cost accounting.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(command)
        command.set_defaults(module=module)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`fareway ARGV...` parsed (argparse exits on bad arguments, as the command does)."""
    return build_parser(argv).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return importlib.import_module(args.module).run(args)
    except KeyboardInterrupt:
        return 130
    except UNREACHABLE as error:
        logging.debug("fareway %s failed", args.command, exc_info=error)
        print(f"fareway {args.command}: cannot reach Redis: {error}", file=sys.stderr)
        return 1
    except (FarewayError, ValueError, OSError) as error:
        # Bad configuration or environment: one line a person can act on, not a traceback.
        message = error.message if isinstance(error, FarewayError) else str(error)
        logging.debug("fareway %s failed", args.command, exc_info=error)
        print(f"fareway {args.command}: {message}", file=sys.stderr)
        return 1
