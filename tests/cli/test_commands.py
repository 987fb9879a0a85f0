"""The `fareway` command as its users run it: child processes (or `main` in
this process where a process adds nothing) against a real Redis and the
session's stack (a gateway in front of the real SmolLM2 worker)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from cli.main import COMMANDS, main
from cli.options import parse_bytes
from cli.report import parse_time
from fareway.errors import shown
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.net import free_port
from fareway.redis.embedded import is_alive

MODEL = "smollm2-135m-instruct"
# Variables a developer's shell may set that would point a child at the wrong stack.
_FAREWAY_ENV = ("REDIS_URL", "FAREWAY_API_KEY", "FAREWAY_GATEWAY", "FAREWAY_DATA_DIR", "FAREWAY_WORKERS")


def fareway(*args: str, redis_url: str | None = None, timeout_s: float = 120, cwd: Path | None = None,
            stdin: str | None = None, extra_env: dict[str, str] | None = None,
            one_stream: bool = False) -> subprocess.CompletedProcess[str]:
    """Runs `python -m cli ARGS` as a user would, with REDIS_URL only if given; `one_stream` sends
    stderr to the same pipe as stdout (as `2>&1 | less` would)."""
    # Without PYTHONUNBUFFERED (set on some CI machines): a user's stdout to a pipe is block-buffered.
    env = {name: value for name, value in os.environ.items() if name not in (*_FAREWAY_ENV, "PYTHONUNBUFFERED")}
    # Wide enough that rich tables are not cut to the 80 columns of a pipe.
    env["COLUMNS"] = "200"
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env |= extra_env or {}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=cwd, input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if one_stream else subprocess.PIPE,
                          text=True, timeout=timeout_s)


def new_team() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def is_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


@pytest.fixture()
def gateway(stack) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:  # noqa: ANN001
    with grpc.insecure_channel(stack.gateway_address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def client_flags(stack, key: str) -> list[str]:  # noqa: ANN001
    return ["--gateway", stack.gateway_address, "--api-key", key, "--temperature", "0"]


def usage_figure(text: str, name: str) -> int:
    """A number from a usage table, e.g. usage_figure(stderr, 'completion tokens')."""
    match = re.search(rf"{name}\W+(\d+)", text)
    assert match, f"no {name!r} in:\n{text}"
    return int(match.group(1))


# --- fareway up -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_up_runs_the_demo_on_embedded_redis_and_leaves_nothing_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ports = {name: free_port() for name in ("gateway", "worker", "accounting")}
    listen = [arg for name, port in ports.items() for arg in (f"--{name}-listen", f"127.0.0.1:{port}")]
    http_port = free_port()
    listen += ["--gateway-http-listen", f"127.0.0.1:{http_port}"]

    result = fareway("up", "--exit-after-demo", "--data-dir", str(data_dir), *listen, cwd=tmp_path, timeout_s=300)

    out = result.stdout
    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr}"
    redis_url = re.search(r"redis: (unix://\S+)", out).group(1)
    assert redis_url == f"unix://{data_dir.resolve()}/redis.sock"
    for name, port in ports.items():
        assert f"{name}: serving on 127.0.0.1:{port}" in out
    assert f"gateway: OpenAI-compatible HTTP on http://127.0.0.1:{http_port}/v1" in out
    key = re.search(r"demo key for demo/quickstart: (fw_\S+)", out).group(1)
    reply = re.search(rf"{MODEL}> (.*?)\n\s*usage", out, re.DOTALL).group(1)
    assert len(reply.split()) >= 3
    completion_tokens = usage_figure(out, "completion tokens")
    assert 0 < completion_tokens <= 96
    assert re.search(r"finish reason\W+(stop|length)", out)
    # The demo team's report: its row, then the total row, with the same completion tokens.
    assert re.search(rf"│ demo\s+│ quickstart\s+│ {MODEL}\s+│\s+1 │.*│\s+{completion_tokens} │", out)
    assert re.search(rf"│ total\s+│.*│\s+{completion_tokens} │", out)
    assert out.rstrip().endswith("stopping...")

    # Everything it started is gone: no listener, no Redis, no child process.
    assert [name for name, port in {**ports, "http": http_port}.items() if is_listening(port)] == []
    assert not is_alive(redis_url)
    assert processes_mentioning(str(data_dir)) == []
    assert [c for port in ports.values() for c in processes_mentioning(f"127.0.0.1:{port}")] == []

    logs = data_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["accounting.log", "gateway.log", "worker.log"]
    assert f"listening on port {ports['gateway']} (gRPC) and {http_port} (HTTP)" in (logs / "gateway.log").read_text()
    assert f"listening on port {ports['worker']}" in (logs / "worker.log").read_text()

    # The embedded Redis kept its data: the next commands on the same data dir see the demo key and its usage.
    keys = fareway("keys", "list", extra_env={"FAREWAY_DATA_DIR": str(data_dir)}, cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    assert re.search(rf"{key.split('_')[1]}\s+│ demo\s+│ quickstart\s+│ tenant .*│ active", keys.stdout)
    report = fareway("report", "--team", "demo", "--format", "json", extra_env={"FAREWAY_DATA_DIR": str(data_dir)},
                     cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    totals = json.loads(report.stdout)["total"]
    assert (totals["requests"], totals["completion_tokens"]) == (1, completion_tokens)
    assert not is_alive(redis_url)


# --- fareway keys -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_the_stack_and_is_a_clean_exit(tmp_path: Path, inherited: str) -> None:
    """Ctrl-C reaches the whole process group, children first as often as not; a shell's background
    job (`make run &`) starts with SIGINT ignored. Either way the stack stops, and exits 0."""
    ports = {name: free_port() for name in ("gateway", "worker", "accounting")}
    listen = [arg for name, port in ports.items() for arg in (f"--{name}-listen", f"127.0.0.1:{port}")]
    http_port = free_port()
    listen += ["--gateway-http-listen", f"127.0.0.1:{http_port}"]
    log = tmp_path / "up.log"
    env = {name: value for name, value in os.environ.items() if name not in _FAREWAY_ENV}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" else None
    with log.open("w") as out:
        up = subprocess.Popen([sys.executable, "-m", "cli", "up", "--no-demo", "--data-dir", str(tmp_path / "data"),
                               *listen], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True, preexec_fn=ignore)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops everything" not in log.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        os.killpg(up.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert up.wait(timeout=60) == 0, log.read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    text = log.read_text()
    assert "exited with" not in text and text.rstrip().endswith("stopping..."), text
    assert [name for name, port in {**ports, "http": http_port}.items() if is_listening(port)] == []


def test_keys_create_prints_a_key_that_authenticates_until_revoked(stack, gateway) -> None:  # noqa: ANN001
    team = new_team()
    created = fareway("keys", "create", "--team", team, "--project", "search", redis_url=stack.redis_url)

    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    key_id = re.search(rf"created tenant key (\w+) for {team}/search", created.stderr).group(1)
    assert key.startswith(f"fw_{key_id}_")
    assert gateway.ListModels(pb.ListModelsRequest(), metadata=bearer(key), timeout=10).models[0].id == MODEL

    listed = fareway("keys", "list", redis_url=stack.redis_url)
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"│ {key_id}\s+│ {team}\s+│ search\s+│ tenant\s+│ [\d-]+ [\d:]+ UTC\s+│ active", listed.stdout)
    assert key not in listed.stdout + listed.stderr

    revoked = fareway("keys", "revoke", key_id, redis_url=stack.redis_url)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked key {key_id} ({team}/search)" in revoked.stderr
    with pytest.raises(grpc.RpcError) as error:
        gateway.ListModels(pb.ListModelsRequest(), metadata=bearer(key), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = fareway("keys", "list", redis_url=stack.redis_url)
    assert re.search(rf"│ {key_id}\s+│ {team}\s+│.*│ revoked", listed.stdout)


def test_keys_create_admin_key(stack) -> None:  # noqa: ANN001
    team = new_team()
    created = fareway("keys", "create", "--team", team, "--project", "ops", "--admin", redis_url=stack.redis_url)
    assert created.returncode == 0, created.stderr
    assert "created admin key" in created.stderr
    listed = fareway("keys", "list", redis_url=stack.redis_url)
    assert re.search(rf"│ {team}\s+│ ops\s+│ admin", listed.stdout)


@pytest.mark.parametrize("team", ["Search", "my team", "-search", "x" * 64, ""])
def test_keys_create_rejects_bad_team_names(redis_server: str, team: str, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server)
    assert main(["keys", "create", f"--team={team}", "--project", "p"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "error:" in err and f"team {shown(team)} must be 1-63 characters" in " ".join(err.split())


def test_keys_revoke_unknown_id_fails(redis_server: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server)
    assert main(["keys", "revoke", "00000000"]) == 1
    assert "error: no API key with id '00000000'" in capsys.readouterr().err


# --- fareway generate and chat ----------------------------------------------------------------------------------


def test_generate_prints_the_text_on_stdout_and_usage_on_stderr(stack, gateway) -> None:  # noqa: ANN001
    team = new_team()
    key = stack.create_key(team, "app")
    prompt = "The capital of France is"

    result = fareway("generate", *client_flags(stack, key), "--max-tokens", "8", "--tag", "feature=cli", prompt)

    assert result.returncode == 0, result.stderr
    expected = gateway.Generate(pb.GenerateRequest(model=MODEL, prompt=prompt,
                                                   sampling=pb.SamplingParams(max_tokens=8, temperature=0.0)),
                                metadata=bearer(key), timeout=60)
    assert result.stdout == expected.text + "\n"
    record, _reference = stack.records(team)  # the command's request, then the reference's
    assert (record.project, record.model, record.tags) == ("app", MODEL, {"feature": "cli"})
    assert "usage" in result.stderr
    assert re.search(r"finish reason\W+length", result.stderr)
    assert usage_figure(result.stderr, "completion tokens") == record.completion_tokens == 8
    assert usage_figure(result.stderr, "prompt tokens") == record.prompt_tokens


def test_generate_ends_the_text_with_a_newline_before_the_usage_on_one_stream(stack) -> None:  # noqa: ANN001
    key = stack.create_key(new_team(), "app")
    result = fareway("generate", *client_flags(stack, key), "--max-tokens", "8", "The capital of France is",
                     one_stream=True)
    assert result.returncode == 0, result.stdout
    text, separator, table = result.stdout.partition("\nusage")
    assert separator and text.strip() and table.lstrip(" ").startswith("\n"), result.stdout


def test_generate_chat_and_stdin(stack) -> None:  # noqa: ANN001
    team = new_team()
    flags = client_flags(stack, stack.create_key(team, "app")) + ["--max-tokens", "4"]

    raw = fareway("generate", *flags, "-", stdin="The capital of France is")
    chat = fareway("generate", *flags, "--chat", "The capital of France is")

    assert raw.returncode == 0 and chat.returncode == 0, raw.stderr + chat.stderr
    assert raw.stdout.strip() and chat.stdout.strip()
    raw_record, chat_record = stack.records(team)
    # --chat wraps the prompt in the model's chat template: more prompt tokens for the same text.
    assert chat_record.prompt_tokens > raw_record.prompt_tokens
    assert usage_figure(chat.stderr, "prompt tokens") == chat_record.prompt_tokens


def test_generate_with_a_bad_key_is_unauthenticated(stack) -> None:  # noqa: ANN001
    result = fareway("generate", *client_flags(stack, "fw_00000000_not-a-real-key"), "Hello")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "UNAUTHENTICATED" in result.stderr and "not valid" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_without_a_key_says_how_to_get_one(stack) -> None:  # noqa: ANN001
    result = fareway("generate", "--gateway", stack.gateway_address, "Hello")
    assert result.returncode == 1
    assert "no API key" in result.stderr and "fareway keys create" in result.stderr


def test_generate_rejects_a_malformed_tag(stack) -> None:  # noqa: ANN001
    result = fareway("generate", *client_flags(stack, stack.create_key(new_team())), "--tag", "feature", "Hello")
    assert result.returncode == 1
    assert "--tag takes KEY=VALUE, got 'feature'" in result.stderr


def test_chat_runs_scripted_turns_with_the_history(stack) -> None:  # noqa: ANN001
    team = new_team()
    result = fareway("chat", *client_flags(stack, stack.create_key(team, "app")), "--max-tokens", "12",
                     "--show-usage", "--message", "My name is Ada.", "--message", "What is my name?")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    first, second = stack.records(team)
    # The second turn carries the first question and its answer.
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    assert result.stderr.count("completion tokens") == 2


def test_chat_with_a_bad_key_fails(stack) -> None:  # noqa: ANN001
    result = fareway("chat", *client_flags(stack, "fw_00000000_not-a-real-key"), "--message", "Hi")
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr


# --- fareway report ---------------------------------------------------------------------------------------------

FIGURES = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens")


@pytest.fixture(scope="module")
def usage(stack) -> tuple[str, dict[tuple[str, str], dict[str, float]]]:  # noqa: ANN001
    """A fresh team with one request in project alpha and two in beta; returns the team
    and the ledger's totals per (team, project)."""
    team = new_team()
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for project, prompts in {"alpha": ["Hello"], "beta": ["One, two,", "Red, green,"]}.items():
            key = stack.create_key(team, project)
            for prompt in prompts:
                stub.Generate(pb.GenerateRequest(model=MODEL, prompt=prompt,
                                                 sampling=pb.SamplingParams(max_tokens=3, temperature=0.0)),
                              metadata=bearer(key), timeout=60)
    totals: dict[tuple[str, str], dict[str, float]] = defaultdict(
        lambda: dict.fromkeys([*FIGURES, "gpu_seconds", "cost_nusd", "list_nusd"], 0))
    for record in stack.records(team):
        row = totals[(record.team, record.project)]
        row["requests"] += 1
        for name in [*FIGURES[1:], "gpu_seconds", "cost_nusd", "list_nusd"]:
            row[name] += getattr(record, name)
    assert sorted(totals) == [(team, "alpha"), (team, "beta")]
    return team, dict(totals)


def report(stack, team: str, *args: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return fareway("report", "--team", team, *args, redis_url=stack.redis_url)


def test_export_and_reconcile_the_month(stack, usage, tmp_path: Path) -> None:  # noqa: ANN001
    team, totals = usage
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    out = tmp_path / "focus.csv"
    result = fareway("export", "--period", month, "--format", "focus", "--output", str(out),
                     redis_url=stack.redis_url)
    assert result.returncode == 0, result.stderr
    rows = [r for r in csv.DictReader(io.StringIO(out.read_text())) if r["SubAccountId"] == team]
    billed = sum(Decimal(r["BilledCost"]) for r in rows)
    assert billed == sum(Decimal(t["cost_nusd"]).scaleb(-9) for t in totals.values()) > 0
    again = fareway("export", "--period", month, "--format", "focus", redis_url=stack.redis_url)
    assert again.stdout == out.read_text()

    checked = fareway("reconcile", "--period", month, redis_url=stack.redis_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "reconciled" in checked.stdout and team in checked.stdout


def test_report_draws_cost_per_team_per_day(stack, usage, tmp_path: Path) -> None:  # noqa: ANN001
    team, _ = usage
    chart = tmp_path / "cost.png"
    result = fareway("report", "--by", "team", "--chart", str(chart), redis_url=stack.redis_url)
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert team in result.stdout


def test_a_bad_period_is_a_usage_error(stack) -> None:  # noqa: ANN001
    result = fareway("export", "--period", "November", redis_url=stack.redis_url)
    assert result.returncode == 2 and "period must be a month like 2026-11" in result.stderr


def test_budgets_and_prices_from_the_command_line(stack, tmp_path: Path) -> None:  # noqa: ANN001
    team = new_team()
    assert fareway("budget", "set", "--team", team, "--hard", "12.5", "--soft", "10",
                   redis_url=stack.redis_url).returncode == 0
    listed = fareway("budget", "list", "--team", team, redis_url=stack.redis_url)
    assert listed.returncode == 0 and "$12.50" in listed.stdout and "$10.00" in listed.stdout
    refused = fareway("budget", "set", "--team", team, "--basis", "list", redis_url=stack.redis_url)
    assert refused.returncode == 1 and "hard limit, a soft threshold or both" in refused.stderr

    shown = fareway("prices", "show", redis_url=stack.redis_url)
    assert shown.returncode == 0 and "nvidia-h100" in shown.stdout and "smollm2-135m-instruct" in shown.stdout
    backdated = tmp_path / "prices.toml"
    backdated.write_text('version = "cli-test"\n[[hardware]]\nclass = "cpu"\nusd_per_device_hour = 9\n'
                         'effective_from = 2020-01-01\n')
    result = fareway("prices", "load", str(backdated), redis_url=stack.redis_url)
    assert result.returncode == 1 and "changes prices in force before" in result.stderr


def test_report_csv_matches_the_ledger(stack, usage) -> None:  # noqa: ANN001
    team, totals = usage
    result = report(stack, team, "--by", "team,project", "--format", "csv")

    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["team", "project", *FIGURES, "cache_hit_rate", "gpu_seconds", "cost_usd", "idle_usd",
                            "list_usd", "usd_per_million_tokens"]
    by_group = {(row["team"], row["project"]): row for row in rows}
    assert by_group.keys() == totals.keys()
    for group, expected in totals.items():
        assert {name: int(by_group[group][name]) for name in FIGURES} == {name: expected[name] for name in FIGURES}
        assert float(by_group[group]["gpu_seconds"]) == pytest.approx(expected["gpu_seconds"])
        # Money to the nano-dollar, as exact decimals.
        assert Decimal(by_group[group]["cost_usd"]) == Decimal(expected["cost_nusd"]).scaleb(-9) > 0
        assert Decimal(by_group[group]["list_usd"]) == Decimal(expected["list_nusd"]).scaleb(-9) > 0
    assert totals[(team, "beta")]["requests"] == 2


def test_report_json_matches_the_ledger(stack, usage) -> None:  # noqa: ANN001
    team, totals = usage
    result = report(stack, team, "--by", "team,project", "--format", "json", "--since", "1h")

    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert [(row["team"], row["project"]) for row in body["rows"]] == sorted(totals)
    for row in body["rows"]:
        expected = totals[(row["team"], row["project"])]
        assert {name: row[name] for name in FIGURES} == {name: expected[name] for name in FIGURES}
        assert row["gpu_seconds"] == pytest.approx(expected["gpu_seconds"])
    for name in FIGURES:
        assert body["total"][name] == sum(group[name] for group in totals.values())


def test_report_shows_the_cost_per_million_tokens_of_each_group(stack, usage) -> None:  # noqa: ANN001
    """The cost to serve over the tokens served (prompt and completion), per 1M, as the ledger has them."""
    team, totals = usage
    csv_result = report(stack, team, "--by", "team,project", "--format", "csv")
    json_result = report(stack, team, "--by", "team,project", "--format", "json")
    table_result = report(stack, team, "--by", "team,project")

    assert csv_result.returncode == json_result.returncode == table_result.returncode == 0, csv_result.stderr
    by_group = {(row["team"], row["project"]): row for row in csv.DictReader(io.StringIO(csv_result.stdout))}
    body = json.loads(json_result.stdout)
    for group, expected in totals.items():
        per_million = expected["cost_nusd"] / 1e3 / (expected["prompt_tokens"] + expected["completion_tokens"])
        assert per_million > 0
        assert float(by_group[group]["usd_per_million_tokens"]) == pytest.approx(per_million, rel=1e-6)
        assert f"${per_million:,.4f}" in table_result.stdout
    assert "USD per 1M tokens" in table_result.stdout
    all_tokens = sum(t["prompt_tokens"] + t["completion_tokens"] for t in totals.values())
    assert body["total"]["usd_per_million_tokens"] == pytest.approx(
        sum(t["cost_nusd"] for t in totals.values()) / 1e3 / all_tokens, rel=1e-6)


def test_report_table_shows_each_group_and_the_total(stack, usage) -> None:  # noqa: ANN001
    team, totals = usage
    result = report(stack, team, "--by", "team,project")

    assert result.returncode == 0, result.stderr
    for (_, project), expected in totals.items():
        figures = r"\s+│\s+".join(f"{int(expected[name]):,}" for name in FIGURES)
        assert re.search(rf"│ {team}\s+│ {project}\s+│\s+{figures} │", result.stdout), result.stdout
    total_requests = sum(group["requests"] for group in totals.values())
    assert re.search(rf"│ total\s+│\s+│\s+{total_requests} │", result.stdout)


def test_report_in_an_80_column_terminal_shows_every_figure_whole(stack, usage) -> None:  # noqa: ANN001
    """Too narrow for the table, the report is a block per group: nothing cut to a letter or two."""
    team, totals = usage
    result = fareway("report", "--team", team, "--by", "team,project,model", redis_url=stack.redis_url,
                     extra_env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in result.stdout, result.stdout
    for (_, project), expected in totals.items():
        at = lines.index(f"{team} / {project} / {MODEL}")
        assert lines[at + 1].startswith(f"  {int(expected['requests']):,} requests, ")
        assert lines[at + 2].startswith(f"  tokens: {int(expected['prompt_tokens']):,} prompt, "
                                        f"{int(expected['cached_tokens']):,} cached ")
        assert lines[at + 2].endswith(f", {int(expected['completion_tokens']):,} completion")
        assert f"list price ${expected['list_nusd'] / 1e9:,.6f}" in lines[at + 3]
        per_million = expected["cost_nusd"] / 1e3 / (expected["prompt_tokens"] + expected["completion_tokens"])
        assert lines[at + 4] == f"  cost per 1M tokens: ${per_million:,.4f}"
    total_requests = sum(group["requests"] for group in totals.values())
    assert lines[lines.index("total") + 1].startswith(f"  {total_requests:,} requests, ")


def test_report_time_range_excludes_usage_outside_it(stack, usage) -> None:  # noqa: ANN001
    team, _ = usage
    before = report(stack, team, "--format", "json", "--until", "2000-01-01")
    after = report(stack, team, "--format", "json", "--since", "2999-01-01T00:00")

    for result in (before, after):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["rows"] == []
        assert json.loads(result.stdout)["total"]["requests"] == 0


def test_report_rejects_a_bad_dimension(stack, capsys: pytest.CaptureFixture[str],  # noqa: ANN001
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    assert main(["report", "--by", "team,colour"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot group by 'colour'" in err


def test_report_rejects_a_bad_time(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--since", "yesterday"])
    assert exit_.value.code == 2
    assert "not a time: 'yesterday'" in capsys.readouterr().err


def test_parse_time_reads_iso_dates_and_times_as_utc_unless_told() -> None:
    utc = dt.UTC
    assert parse_time("2026-11-24") == dt.datetime(2026, 11, 24, tzinfo=utc).timestamp()
    assert parse_time("2026-11-24T09:30") == dt.datetime(2026, 11, 24, 9, 30, tzinfo=utc).timestamp()
    assert parse_time("2026-11-24T09:30+02:00") == dt.datetime(2026, 11, 24, 7, 30, tzinfo=utc).timestamp()
    assert parse_time("2026-11-24T09:30:00Z") == dt.datetime(2026, 11, 24, 9, 30, tzinfo=utc).timestamp()


@pytest.mark.parametrize(("age", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400), ("1.5h", 5400),
                                              ("7d", 7 * 86400)])
def test_parse_time_reads_ages_back_from_now(age: str, seconds: float) -> None:
    now = 1_800_000_000.0
    assert parse_time(age, now=now) == now - seconds
    assert parse_time(age) == pytest.approx(dt.datetime.now(dt.UTC).timestamp() - seconds, abs=5)


@pytest.mark.parametrize("text", ["yesterday", "24 h", "-1h", "1w", "", "2026-13-01"])
def test_parse_time_rejects_other_text(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a time"):
        parse_time(text)


# --- parse_bytes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1073741824", 2**30), ("64 KiB", 65536),
    ("1.5gib", 3 * 2**29), ("100b", 100), (" 2 TB ", 2 * 10**12), ("1e3", 1000),
])
def test_parse_bytes_reads_sizes(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "lots", "12 parsecs", "0", "-1GiB", "0.1b", "inf", "1e400", "nan"])
def test_parse_bytes_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_worker_reports_a_bad_kv_cache_size_as_a_usage_error() -> None:
    result = fareway("worker", "--kv-cache-memory", "inf")
    assert result.returncode == 2
    assert "argument --kv-cache-memory: invalid parse_bytes value: 'inf'" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_flags_shape_the_engine(tmp_path: Path) -> None:
    from cli.worker import add_arguments, config_from_args

    system = tmp_path / "system.txt"
    system.write_text("You are the assistant of Example Corp.", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args([
        "--no-prefix-caching", "--shared-system-prompt-file", str(system), "--kv-cache-memory", "2GiB",
        "--kv-cache-free-memory-fraction", "0.5", "--max-num-seqs", "32", "--max-num-batched-tokens", "512"]))
    assert not config.enable_prefix_caching
    assert config.shared_system_prompts == ("You are the assistant of Example Corp.",)
    assert (config.runner.kv_cache_memory_bytes, config.runner.kv_cache_free_memory_fraction) == (2 << 30, 0.5)
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (32, 512)
    assert config_from_args(parser.parse_args([])).enable_prefix_caching
    assert not config_from_args(parser.parse_args(["--no-enforce-eager"])).runner.enforce_eager
    assert config_from_args(parser.parse_args(["--enforce-eager"])).runner.enforce_eager


def test_worker_reports_an_unreadable_shared_prefix_file_in_one_line(tmp_path: Path) -> None:
    result = fareway("worker", "--shared-prefix-file", str(tmp_path / "missing.txt"))
    assert result.returncode != 0
    assert "cannot read" in result.stderr and "missing.txt" in result.stderr
    assert "Traceback" not in result.stderr


# --- help -------------------------------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = fareway("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.MULTILINE), name


@pytest.mark.parametrize("argv", [[name, "--help"] for name in COMMANDS]
                         + [["keys", action, "--help"] for action in ("create", "list", "revoke")])
def test_each_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fareway {' '.join(argv[:-1])}")


def test_gateway_flags_choose_the_registry_and_a_routing_policy_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import gateway as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.delenv("FAREWAY_WORKERS", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    args = parser.parse_args(["--routing", "cost", "--routing", "tiny=round-robin"])
    assert cli._use_registry(args) and cli._workers(args, True) == ()
    assert cli._routing(args) == ("cost", (("tiny", "round-robin"),))
    args = parser.parse_args(["--worker", "w:50052"])
    assert not cli._use_registry(args) and cli._workers(args, False) == ("w:50052",)
    assert cli._use_registry(parser.parse_args(["--worker", "w:50052", "--registry"]))
    monkeypatch.delenv("REDIS_URL")
    args = parser.parse_args([])
    assert not cli._use_registry(args) and cli._workers(args, False) == ("127.0.0.1:50052",)
    with pytest.raises(SystemExit, match="unknown policy"):
        cli._routing(parser.parse_args(["--routing", "fastest"]))


def test_a_worker_advertises_its_host_name_for_a_wildcard_listen_address() -> None:
    from workers.heartbeat import advertised_address

    assert advertised_address("0.0.0.0:50052", 50052) == f"{socket.gethostname()}:50052"
    assert advertised_address("[::]:0", 41234) == f"{socket.gethostname()}:41234"
    assert advertised_address("127.0.0.1:0", 41234) == "127.0.0.1:41234"
    assert advertised_address("0.0.0.0:50052", 50052, "worker-3.internal:50052") == "worker-3.internal:50052"


def test_rate_limits_from_the_command_line(stack) -> None:  # noqa: ANN001
    team = new_team()
    assert fareway("limits", "set", "--team", team, "--rpm", "600", "--concurrent", "4",
                   redis_url=stack.redis_url).returncode == 0
    assert fareway("limits", "set", "--team", team, "--project", "ranking", "--tpm", "250000", "--weight", "2.5",
                   redis_url=stack.redis_url).returncode == 0
    listed = fareway("limits", "list", "--team", team, redis_url=stack.redis_url)
    assert listed.returncode == 0, listed.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in listed.stdout.splitlines() if team in line]
    assert rows == [[team, "team", "600", "-", "4", "-", "-"], [team, "project:ranking", "-", "250,000", "-", "2.5", "-"]]
    assert team in fareway("limits", "list", redis_url=stack.redis_url).stdout
    refused = fareway("limits", "set", "--team", team, "--rpm", "0", redis_url=stack.redis_url)
    assert refused.returncode == 1 and "requests_per_minute must be at least 1" in refused.stderr
    assert fareway("limits", "delete", "--team", team, redis_url=stack.redis_url).returncode == 0
    assert fareway("limits", "delete", "--team", team, redis_url=stack.redis_url).returncode == 1
    listed = fareway("limits", "list", "--team", team, redis_url=stack.redis_url)
    assert [line.split("│")[2].strip() for line in listed.stdout.splitlines() if team in line] == ["project:ranking"]


def test_limits_changed_on_the_command_line_and_over_grpc_keep_what_neither_names(stack) -> None:  # noqa: ANN001
    """One admin path: the command and the SetLimits RPC change only the limits they are given."""
    from google.protobuf import field_mask_pb2

    from fareway.accounting.v1 import accounting_pb2 as apb
    from fareway.accounting.v1 import accounting_pb2_grpc

    team = new_team()
    assert fareway("limits", "set", "--team", team, "--weight", "2.5", "--priority", "1",
                   redis_url=stack.redis_url).returncode == 0
    auth = (("authorization", f"Bearer {stack.create_key('platform', 'ops', admin=True)}"),)
    with grpc.insecure_channel(stack.accounting_address) as channel:
        stub = accounting_pb2_grpc.AccountingServiceStub(channel)
        changed = stub.SetLimits(apb.SetLimitsRequest(limits=apb.Limits(team=team, requests_per_minute=100)),
                                 metadata=auth).limits
        assert (changed.requests_per_minute, changed.weight, changed.priority) == (100, 2.5, 1)
        assert not changed.HasField("tokens_per_minute")
        cleared = stub.SetLimits(apb.SetLimitsRequest(limits=apb.Limits(team=team),
                                                      update_mask=field_mask_pb2.FieldMask(paths=["priority"])),
                                 metadata=auth).limits
        assert (cleared.requests_per_minute, cleared.weight, cleared.HasField("priority")) == (100, 2.5, False)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.SetLimits(apb.SetLimitsRequest(limits=apb.Limits(team=team),
                                                update_mask=field_mask_pb2.FieldMask(paths=["speed"])), metadata=auth)
        assert unknown.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "speed" in unknown.value.details()
    assert fareway("limits", "set", "--team", team, "--rpm", "none", "--tpm", "5000",
                   redis_url=stack.redis_url).returncode == 0
    listed = fareway("limits", "list", "--team", team, redis_url=stack.redis_url)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in listed.stdout.splitlines() if team in line]
    assert rows == [[team, "team", "-", "5,000", "-", "2.5", "-"]]
    refused = fareway("limits", "set", "--team", team, "--weight", "heavy", redis_url=stack.redis_url)
    assert refused.returncode == 2 and "not a number: 'heavy'" in refused.stderr
