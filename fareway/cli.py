"""The `fareway` command. Each subcommand lives with the package it runs and
is imported only when chosen, so `fareway keys` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fareway.errors import FarewayError
from fareway.redis import UNREACHABLE

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("fareway.stack", "run the whole stack (Redis, worker, accounting, gateway) and a demo request"),
    "worker": ("workers.cli", "serve a model on this machine's devices (the WorkerService)"),
    "gateway": ("gateway.cli", "serve the public InferenceService in front of workers"),
    "accounting": ("accounting.cli", "serve usage reports (the AccountingService)"),
    "keys": ("fareway.keys_cli", "create, list or revoke API keys"),
    "generate": ("fareway.client_cli", "send one generation request to a gateway"),
    "chat": ("fareway.chat_cli", "chat with a model through a gateway"),
    "report": ("accounting.report_cli", "print usage and cost per team, project, model, ..."),
    "export": ("accounting.export_cli", "a month's chargeback as CSV, JSON Lines or FinOps FOCUS"),
    "reconcile": ("accounting.reconcile_cli", "check that ledger, rollups and export agree for a month"),
    "budget": ("accounting.budget_cli", "set, list or delete monthly team and project budgets"),
    "limits": ("gateway.limits_cli", "set, list or delete requests, tokens per minute and concurrency limits"),
    "prices": ("accounting.prices_cli", "load a price book version, or show the prices in force"),
    "plan": ("fareway.plan_cli", "size a model on a hardware class: weights, KV cache, conversations, cost"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fareway", description="A gRPC inference gateway with cost accounting.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
        command.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
