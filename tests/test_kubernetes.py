"""deploy/kubernetes/ renders, with kubectl's built-in kustomize, into objects the Kubernetes API
schema accepts, and they run real `fareway` commands on the ports, health services and metrics the
code really has."""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from accounting.pricebook import DEFAULT_PRICE_BOOK, PriceBook
from accounting.records import UsageRecord
from cli.main import parse_args
from fareway.accounting.v1 import accounting_pb2
from fareway.inference.v1 import inference_pb2
from fareway.redis import SOCKET_TIMEOUT_S
from fareway.worker.v1 import worker_pb2
from gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
OVERLAYS = ("amd", "cpu", "nvidia", "vllm")
COMPONENTS = ("price-book", "prometheus-operator", "redis-operator", "vllm-upstream")
BUILDS = (*(f"overlays/{name}" for name in OVERLAYS), *(f"components/{name}" for name in COMPONENTS))
# The oldest Kubernetes the manifests need (native sidecar containers are on by default from 1.29)
# and the newest whose schema kubernetes-validate ships.
SCHEMA_VERSIONS = ("1.29", "1.37")
# Kinds whose schema comes with their operator's CRD, not with Kubernetes: not validated here.
CUSTOM_RESOURCES = {
    ("redis.redis.opstreelabs.in/v1beta2", "Redis"),  # components/redis-operator
    ("monitoring.coreos.com/v1", "PodMonitor"),  # components/prometheus-operator
}
SERVICE_NAMES = {  # what each serving command registers with grpc.health.v1
    "gateway": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    "worker": worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    "accounting": accounting_pb2.DESCRIPTOR.services_by_name["AccountingService"].full_name,
}
# Values standing in for the $(VAR) references Kubernetes expands in command and args.
FIELD_VALUES = {"status.podIP": "10.1.2.3"}
GPU_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: its built-in kustomize renders deploy/kubernetes/")


@functools.cache
def render(build: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` makes of overlays/NAME, or of the base with components/NAME."""
    if build.startswith("overlays/"):
        return _kustomize(KUBERNETES / build)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            # kustomize takes no absolute paths to other kustomizations.
            "resources": [os.path.relpath(KUBERNETES / "base", folder)],
            "components": [os.path.relpath(KUBERNETES / build, folder)]}))
        return _kustomize(Path(folder))


def _kustomize(folder: Path) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_specs(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) of every Deployment and Job."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", ()), *pod["containers"]]


def is_fareway(container: dict[str, Any]) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == "fareway"


def fareway_containers(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) of every container running the Fareway image."""
    for name, pod in pod_specs(objects):
        for container in all_containers(pod):
            if is_fareway(container):
                yield name, pod, container


def argv(container: dict[str, Any]) -> list[str]:
    """command + args as Kubernetes runs them, each $(VAR) replaced by a stand-in for its value."""
    env = {e["name"]: e.get("value") or FIELD_VALUES.get(e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"))
           for e in container.get("env", ())}

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        # An undefined reference is passed on as the literal text "$(NAME)".
        assert env.get(name), f"{container['name']}: $({name}) is not an env var with a value or a known field"
        return env[name]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, word)
            for word in (*container.get("command", ()), *container.get("args", ()))]


def fareway_args(container: dict[str, Any]):  # noqa: ANN201 - argparse.Namespace
    """The container's command line parsed by `fareway`'s own parser."""
    words = argv(container)
    assert words[0] == "fareway", f"{container['name']} runs {words[0]!r}, not fareway"
    try:
        return parse_args(words[1:])
    except SystemExit:  # argparse has printed why
        pytest.fail(f"{container['name']}: `{' '.join(words)}` is not a valid fareway command line")


def flag(container: dict[str, Any], name: str) -> str:
    """The value after `name` on a foreign container's command line."""
    words = argv(container)
    assert name in words, f"{container['name']} has no {name}"
    return words[words.index(name) + 1]


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as a number, which the container declares."""
    declared = {p["name"]: p["containerPort"] for p in container.get("ports", ()) if "name" in p}
    number = declared.get(port) if isinstance(port, str) else port
    assert number in {p["containerPort"] for p in container.get("ports", ())}, \
        f"{container['name']} declares no port {port!r}"
    return number


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def serves(container: dict[str, Any], port: int | str) -> bool:
    return any(port in (p.get("name"), p["containerPort"]) for p in container.get("ports", ()))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_is_valid_against_the_kubernetes_api_schema(build: str) -> None:
    for obj in render(build):
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue
        for version in SCHEMA_VERSIONS:
            what = f"{build}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                pytest.fail(f"{what} is not valid Kubernetes {version}: {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                pytest.fail(f"{what}: {error.message} (a custom resource belongs in CUSTOM_RESOURCES)")


def test_every_overlay_and_component_is_tested() -> None:
    assert tuple(sorted(p.name for p in (KUBERNETES / "overlays").iterdir())) == OVERLAYS
    assert tuple(sorted(p.name for p in (KUBERNETES / "components").iterdir())) == COMPONENTS


@pytest.mark.parametrize("build", BUILDS)
def test_every_fareway_container_runs_a_real_fareway_command(build: str) -> None:
    commands, images = set(), set()
    for name, _, container in fareway_containers(render(build)):
        args = fareway_args(container)
        commands.add(args.command)
        images.add(container["image"])
        assert name.startswith("fareway-"), name
        if args.command in SERVICE_NAMES:
            assert listen_port(args.listen) in {p["containerPort"] for p in container["ports"]}, \
                f"{name} listens on {args.listen}, a port its container does not declare"
        if args.command == "worker":
            # Gateways dial what the worker registers: its pod's address and its own port.
            assert args.advertise_address == f"{FIELD_VALUES['status.podIP']}:{listen_port(args.listen)}", name
    assert {"gateway", "worker", "accounting"} <= commands
    # One image, tagged, for every Fareway container: an overlay's `images:` reaches them all.
    [image] = images
    assert re.fullmatch(r"fareway:[\w.-]+", image), image


@pytest.mark.parametrize("build", BUILDS)
def test_every_server_is_probed_through_its_grpc_health_service(build: str) -> None:
    for name, _, container in fareway_containers(render(build)):
        args = fareway_args(container)
        if args.command not in SERVICE_NAMES:
            continue
        port = listen_port(args.listen)
        for probe_name in ("readinessProbe", "startupProbe", "livenessProbe"):
            probe = container.get(probe_name)
            if probe is None:
                continue
            if args.command == "gateway" and probe_name == "livenessProbe":
                # The gateway's health follows its workers: restarting it would not bring them back.
                assert "grpc" not in probe and port_number(container, probe["tcpSocket"]["port"]) == port, name
                continue
            assert probe["grpc"] == {"port": port, "service": SERVICE_NAMES[args.command]}, f"{name} {probe_name}"
            port_number(container, probe["grpc"]["port"])
        assert "readinessProbe" in container and "livenessProbe" in container, name
        if args.command == "worker" and args.engine == "fareway":
            assert "startupProbe" in container, f"{name}: loading the model must not count against liveness"


@pytest.mark.parametrize("build", BUILDS)
def test_every_service_and_disruption_budget_selects_pods_that_serve_its_ports(build: str) -> None:
    objects = render(build)
    pods = [(obj["spec"]["template"]["metadata"]["labels"], obj["spec"]["template"]["spec"], obj)
            for obj in of_kind(objects, "Deployment").values()]
    for name, service in of_kind(objects, "Service").items():
        chosen = [(pod, deployment) for labels, pod, deployment in pods if selects(service["spec"]["selector"], labels)]
        assert chosen, f"Service {name} selects no pods"
        for pod, _ in chosen:
            for port in service["spec"]["ports"]:
                assert any(serves(c, port["targetPort"]) for c in all_containers(pod)), \
                    f"Service {name}: no container serves {port['targetPort']}"
    for name, budget in of_kind(objects, "PodDisruptionBudget").items():
        chosen = [d for labels, _, d in pods if selects(budget["spec"]["selector"]["matchLabels"], labels)]
        assert len(chosen) == 1, f"PodDisruptionBudget {name} selects {len(chosen)} Deployments"
        replicas = chosen[0]["spec"].get("replicas")
        if replicas is not None and "minAvailable" in budget["spec"]:
            assert budget["spec"]["minAvailable"] < replicas, f"{name} would block every node drain"


def gateway_series() -> set[str]:
    """The series names the gateway's metrics have on its Prometheus endpoint (--metrics-port)."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        metrics = GatewayMetrics(provider.get_meter("fareway.gateway"))
        metrics.observe_queues(lambda: [("m", ("team", "project"), 1)])
        now = time.time()
        metrics.finished(UsageRecord(
            request_id="r", team="team", project="project", key_id="k", model="m", worker_id="w",
            hardware_class="cpu", device_count=1, prompt_tokens=3, cached_tokens=0, completion_tokens=2,
            gpu_seconds=0.1, queue_ms=0, ttft_ms=10, total_ms=20, status="OK", finish_reason="stop",
            started_at=now, ended_at=now, cost_nusd=5))
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def adapter_metrics() -> dict[str, str]:
    """The custom metrics prometheus-adapter serves with our values -> the series each comes from."""
    served = {}
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group(0)
        assert set(rule["resources"]["overrides"]) >= {"namespace", "pod"}, "a per-pod metric needs pod labels"
        served[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)] = series
    return served


def test_the_gateway_autoscales_on_a_metric_it_exports() -> None:
    objects = render("overlays/cpu")
    [autoscaler] = of_kind(objects, "HorizontalPodAutoscaler").values()
    target = autoscaler["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    deployment = of_kind(objects, "Deployment")[target["name"]]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = fareway_args(container)
    assert args.command == "gateway"
    assert "replicas" not in deployment["spec"], "every apply would reset the autoscaler's replica count"
    pods_metrics = [m["pods"] for m in autoscaler["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics, "the autoscaler scales on no Fareway metric"
    exported, served = gateway_series(), adapter_metrics()
    for metric in pods_metrics:
        name = metric["metric"]["name"]
        assert name in served, f"prometheus-adapter's values serve no metric {name}"
        assert served[name] in exported, f"{name} comes from {served[name]}, which the gateway does not export"
    assert port_number(container, "metrics") == args.metrics_port
    template = deployment["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    [monitor] = of_kind(render("components/prometheus-operator"), "PodMonitor").values()
    assert selects(monitor["spec"]["selector"]["matchLabels"], template["labels"])
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize("build", BUILDS)
def test_workers_drain_within_their_termination_grace_period(build: str) -> None:
    for name, pod, container in fareway_containers(render(build)):
        args = fareway_args(container)
        grace = pod.get("terminationGracePeriodSeconds", 30)  # the Kubernetes default
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        waited = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        if args.command == "worker":
            # Then its last device-time report, which a stalled Redis holds up to the socket timeout.
            needed = waited + args.drain_timeout + SOCKET_TIMEOUT_S
            assert grace > needed, f"{name}: {grace} s of grace for {needed:.0f} s of draining"
        elif args.command == "gateway":
            # 5 s for running calls (RunningServer.stop), then the answered records' write.
            needed = waited + 5 + SOCKET_TIMEOUT_S
            assert waited > 0, f"{name}: no preStop gives the endpoints time to drop the gateway"
            assert grace > needed, f"{name}: {grace} s of grace for {needed:.0f} s of stopping"


def accelerators(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, int]]:
    """The accelerator resources each worker pod's containers ask for, by workload."""
    asked = {}
    for name, pod in pod_specs(objects):
        limits = [c.get("resources", {}).get("limits", {}) for c in all_containers(pod)]
        asked[name] = {r: sum(int(lim.get(r, 0)) for lim in limits) for r in GPU_RESOURCES.values()}
    return asked


@pytest.mark.parametrize("vendor", sorted(GPU_RESOURCES))
def test_gpu_overlays_give_each_worker_its_vendors_gpu(vendor: str) -> None:
    objects = render(f"overlays/{vendor}")
    asked = accelerators(objects)
    resource = GPU_RESOURCES[vendor]
    assert asked.pop("fareway-worker") == {r: (1 if r == resource else 0) for r in GPU_RESOURCES.values()}
    assert all(not any(counts.values()) for counts in asked.values()), "only workers hold GPUs"
    worker = of_kind(objects, "Deployment")["fareway-worker"]["spec"]["template"]["spec"]
    [container] = worker["containers"]
    requests = container["resources"]["requests"]
    assert requests.get(resource) == container["resources"]["limits"][resource]
    assert any(t["key"] == resource for t in worker["tolerations"])
    assert container["image"].startswith("fareway:") and container["image"] != "fareway:latest", \
        "GPU workers need an image built with GPU PyTorch wheels"


def test_the_cpu_overlay_asks_for_no_gpu() -> None:
    assert all(not any(counts.values()) for counts in accelerators(render("overlays/cpu")).values())


def test_the_vllm_pod_pairs_the_engine_with_a_worker_fronting_it_on_localhost() -> None:
    objects = render("overlays/vllm")
    deployments = of_kind(objects, "Deployment")
    assert "fareway-worker" not in deployments, "the overlay serves vLLM in place of the native worker"
    pod = deployments["fareway-worker-vllm"]["spec"]["template"]["spec"]
    [engine] = pod["initContainers"]
    [worker] = pod["containers"]
    # A native sidecar: started (and its startupProbe passed) before the worker, stopped after it drains.
    assert engine["restartPolicy"] == "Always" and "startupProbe" in engine
    assert engine["image"].startswith("vllm/vllm-openai:")
    args = fareway_args(worker)
    assert (args.command, args.engine) == ("worker", "openai")
    engine_port = int(flag(engine, "--port"))
    assert port_number(engine, engine["startupProbe"]["httpGet"]["port"]) == engine_port
    assert args.upstream == f"http://127.0.0.1:{engine_port}/v1"
    assert args.upstream_metrics == f"http://127.0.0.1:{engine_port}/metrics"
    assert args.model == flag(engine, "--model")
    assert args.max_num_seqs == int(flag(engine, "--max-num-seqs")), "fair queueing counts on the engine's slots"
    gpus = int(engine["resources"]["limits"]["nvidia.com/gpu"])
    assert args.device_count == gpus == int(flag(engine, "--tensor-parallel-size"))
    assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})


def test_the_hardware_classes_named_are_priced() -> None:
    workers = [fareway_args(c) for build in BUILDS for _, _, c in fareway_containers(render(build))]
    named = {args.hardware_class for args in workers if args.command == "worker" and args.engine == "openai"}
    assert named
    for path in (DEFAULT_PRICE_BOOK, KUBERNETES / "components" / "price-book" / "prices.toml"):
        priced = {p.hardware_class for p in PriceBook.load(path).hardware}
        assert named <= priced, f"{path} does not price {named - priced}"


def test_the_price_book_job_loads_the_mounted_file() -> None:
    objects = render("components/price-book")
    [job] = of_kind(objects, "Job").values()
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = fareway_args(container)
    assert (args.command, args.action) == ("prices", "load")
    [mount] = [m for m in container["volumeMounts"] if args.file.is_relative_to(m["mountPath"])]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = of_kind(objects, "ConfigMap")[volume["configMap"]["name"]]
    assert args.file.name in config_map["data"]
    PriceBook.from_toml(config_map["data"][args.file.name])


def test_the_redis_component_points_every_fareway_container_at_the_redis_it_creates() -> None:
    objects = render("components/redis-operator")
    [redis] = of_kind(objects, "Redis").values()
    [secret] = of_kind(objects, "Secret").values()
    url = base64.b64decode(secret["data"]["REDIS_URL"]).decode()
    # The operator's Service is named after the Redis resource.
    assert url == f"redis://{redis['metadata']['name']}:6379/0"
    assert redis["spec"]["storage"], "without storage the operator runs Redis without persistence"
    for name, _, container in fareway_containers(objects):
        [ref] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "REDIS_URL"]
        assert ref == {"name": secret["metadata"]["name"], "key": "REDIS_URL"}, name


@pytest.mark.parametrize("build", BUILDS)
def test_fareway_pods_run_as_non_root_on_a_read_only_root_filesystem(build: str) -> None:
    for name, pod, container in fareway_containers(render(build)):
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, name
        assert security.get("readOnlyRootFilesystem") is True, name
        assert security.get("allowPrivilegeEscalation") is False, name
        assert security.get("capabilities") == {"drop": ["ALL"]}, name
        assert pod.get("automountServiceAccountToken") is False, name
        mounted = {m["mountPath"] for m in container.get("volumeMounts", ())}
        home = {e["name"]: e.get("value") for e in container["env"]}.get("HOME")
        assert home in mounted, f"{name}: HOME must be a writable volume"


@pytest.mark.parametrize("build", BUILDS)
def test_every_container_has_requests_and_a_memory_limit_and_objects_are_labelled(build: str) -> None:
    for name, pod in pod_specs(render(build)):
        for container in all_containers(pod):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{name}/{container['name']}"
            assert "memory" in resources.get("limits", {}), f"{name}/{container['name']}"
    for obj in render(build):
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "fareway", f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "fareway"
