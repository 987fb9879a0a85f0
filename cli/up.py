"""`fareway up`: the whole stack in one process tree, on embedded defaults.

Redis (embedded unless REDIS_URL is set), a worker, the accounting service and
a gateway each run as a child process with the same `fareway` subcommand
docker-compose runs; their logs go to <data-dir>/logs/. Once all report
SERVING, a demo key is created and one chat request goes through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from accounting.admin import Admin
from accounting.ledger import Ledger
from accounting.reports import UsageReport, usage_report
from cli.render import usage_table
from cli.report import write_report
from fareway.config import RedisConfig
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.redis import connect
from fareway.redis.embedded import resolve_url

DEMO_TEAM, DEMO_PROJECT = "demo", "quickstart"
DEMO_QUESTION = "In two sentences, why do GPUs make language models fast?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FAREWAY_DATA_DIR", "var")),
                        help="embedded Redis data and service logs (default: %(default)s)")
    parser.add_argument("--gateway-listen", default="127.0.0.1:50051")
    parser.add_argument("--gateway-http-listen", default="127.0.0.1:8080",
                        help="the gateway's OpenAI-compatible HTTP edge (default: %(default)s)")
    parser.add_argument("--worker-listen", default="127.0.0.1:50052")
    parser.add_argument("--accounting-listen", default="127.0.0.1:50053")
    parser.add_argument("--model", default=None, help="passed to the worker (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo key and request")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo has run")


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


def _spawn(name: str, args: list[str], address: str, env: dict[str, str], logs: Path) -> Child:
    log_path = logs / f"{name}.log"
    log_file = log_path.open("ab")
    process = subprocess.Popen([sys.executable, "-m", "cli", name, *args], env=env,
                               stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    return Child(name, address, process, log_path, log_file)


def _wait_serving(child: Child, deadline: float) -> None:
    with grpc.insecure_channel(child.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}; see {child.log_path}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{child.name} did not report SERVING in time; see {child.log_path}")


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        child.log_file.close()


def _demo(url: str, gateway: str, console: Console) -> tuple[str, str]:
    """Creates a demo key, sends one chat request, prints the reply, its usage and the team's report;
    the key and the model."""
    async def create_key() -> str:
        redis = connect(url)
        try:
            key, _ = await Admin(redis).create_key(DEMO_TEAM, DEMO_PROJECT)
            return key
        finally:
            await redis.aclose()

    async def report() -> UsageReport:
        redis = connect(url)
        try:
            return await usage_report(Ledger(redis), ["team", "project", "model"], teams=[DEMO_TEAM])
        finally:
            await redis.aclose()

    key = asyncio.run(create_key())
    console.print(f"\n[bold]demo key[/bold] for {DEMO_TEAM}/{DEMO_PROJECT}: {key}", highlight=False)
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        model = stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10).models[0].id
        request = pb.GenerateStreamRequest(
            model=model, sampling=pb.SamplingParams(max_tokens=96, temperature=0.0), tags={"feature": "demo"})
        request.chat.messages.add(role="user", content=DEMO_QUESTION)
        console.print(f"[bold]you>[/bold] {DEMO_QUESTION}\n[bold]{model}>[/bold] ", end="", highlight=False)
        last = pb.GenerateStreamResponse()
        for last in stub.GenerateStream(request, metadata=metadata, timeout=120):
            console.print(last.text, end="", highlight=False, markup=False)
        console.print()
    console.print(usage_table(last.usage, last.finish_reason))
    write_report(asyncio.run(report()), "table")
    return key, model


class _StopRequested:
    """SIGINT (Ctrl-C) and SIGTERM stop the stack, however this process was started: a shell's
    background job inherits SIGINT ignored, while the children, which handle it themselves, would still
    stop on it. The signal raises KeyboardInterrupt, to leave whatever is waiting, and is remembered."""

    def __init__(self) -> None:
        self.is_set = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.is_set:
            self.is_set = True
            raise KeyboardInterrupt

    def within(self, seconds: float) -> bool:
        """Whether a stop was asked for, waiting up to `seconds` for one (a signal sent to the whole
        process group may reach a child that stops on it before it reaches this process)."""
        deadline = time.monotonic() + seconds
        try:
            while not self.is_set and time.monotonic() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:
            pass
        return self.is_set


_STOP_GRACE_S = 2.0


def _wait_for_exit(children: list[Child], stop: _StopRequested) -> Child | None:
    """Blocks until a stop is asked for (returns None) or a child exits unasked (returns it)."""
    try:
        while True:
            for child in children:
                if child.process.poll() is not None:
                    return None if stop.within(_STOP_GRACE_S) else child
            time.sleep(0.5)
    except KeyboardInterrupt:
        return None


def run(args: argparse.Namespace) -> int:
    console = Console()
    stop = _StopRequested()
    stop.install()
    logs = args.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis_config = RedisConfig(url=os.environ.get("REDIS_URL") or None, data_dir=args.data_dir)
    with resolve_url(redis_config) as url:
        env = {**os.environ, "REDIS_URL": url}
        console.print(f"redis: {url}", highlight=False)
        worker_args = ["--listen", args.worker_listen] + (["--model", args.model] if args.model else [])
        children = [
            _spawn("worker", worker_args, args.worker_listen, env, logs),
            _spawn("accounting", ["--listen", args.accounting_listen], args.accounting_listen, env, logs),
            _spawn("gateway", ["--listen", args.gateway_listen, "--http-listen", args.gateway_http_listen,
                               "--worker", args.worker_listen, "--spool-dir", str(args.data_dir / "spool")],
                   args.gateway_listen, env, logs),
        ]
        try:
            deadline = time.monotonic() + args.startup_timeout
            with console.status("starting worker (loading the model), accounting and gateway..."):
                for child in children:
                    _wait_serving(child, deadline)
            for child in children:
                console.print(f"{child.name}: serving on {child.address} (log: {child.log_path})", highlight=False)
            console.print(f"gateway: OpenAI-compatible HTTP on http://{args.gateway_http_listen}/v1", highlight=False)
            key, model = (None, None) if args.no_demo else _demo(url, args.gateway_listen, console)
            if args.exit_after_demo:
                return 0
            _print_next_steps(console, args.gateway_listen, args.gateway_http_listen, url, key, model)
            exited = _wait_for_exit(children, stop)
            if exited is not None:
                console.print(f"[red]{exited.name} exited with {exited.process.returncode}[/red]; "
                              f"see {exited.log_path}")
                return 1
            return 0
        except (KeyboardInterrupt, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not stop.within(_STOP_GRACE_S):
                raise  # a child failed to start
            return 0  # a stop was asked for while starting: a clean exit too
        finally:
            console.print("stopping...")
            _stop(children)


def _print_next_steps(console: Console, gateway: str, http: str, url: str, key: str | None,
                      model: str | None) -> None:
    key_text = key or "$(.venv/bin/fareway keys create --team myteam --project myproject | tail -1)"
    model = model or "MODEL"   # GET /v1/models names them
    console.print(f"""
Fareway is serving on {gateway} (gRPC) and http://{http}/v1 (OpenAI-compatible). From another terminal:
  export REDIS_URL={url}
  export FAREWAY_API_KEY={key_text}
  .venv/bin/fareway chat
  .venv/bin/fareway generate --chat "Write a haiku about cheap inference"
  .venv/bin/fareway report --by team,project,model
Over HTTP:
  curl http://{http}/v1/chat/completions -H "Authorization: Bearer $FAREWAY_API_KEY" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
With the OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="http://{http}/v1", api_key="{key or '<API key>'}")
  reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content, reply.usage)
Ctrl-C stops everything.""", highlight=False, markup=False)
