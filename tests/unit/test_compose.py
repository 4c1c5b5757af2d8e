"""The container image and the compose stack, checked without a container engine.

Every command a service runs is parsed by the real command-line parser it will meet, every
BRIDGE_* variable must be a setting, and ports, health checks, dependencies and Prometheus
targets must agree with each other.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import dramatiq.cli
import pytest
import yaml

from bridge.cli import _parser as bridge_parser
from bridge.settings import Settings
from tests.support.compose import (
    COMPOSE_FILE,
    REPO,
    dockerfile_instructions,
    duration,
    load_compose,
    published_ports,
    service_argv,
    service_env,
)

COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = [name for name, service in SERVICES.items() if "build" in service]
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
SCALE_OVERRIDE = REPO / "deploy" / "compose.scale.yml"


def module_file(name: str) -> Path | None:
    """The repository file of a module, found without importing it or its package."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def load_standalone(name: str) -> ModuleType:
    # Executing tasks/__init__.py here would set the global dramatiq broker and register the
    # example handlers for every later test of the session; the CLI modules need neither.
    path = module_file(name)
    assert path is not None, f"no module {name} in the repository"
    spec = importlib.util.spec_from_file_location(f"_compose_check_{name.replace('.', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} rejects {argv}", pytrace=False)


def scripts() -> dict[str, str]:
    return dict(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def exposed_ports() -> set[str]:
    return {port.split("/")[0] for keyword, args in dockerfile_instructions() if keyword == "EXPOSE"
            for port in args.split()}


def test_the_compose_file_parses_and_every_service_has_an_image_or_a_build() -> None:
    assert isinstance(yaml.safe_load(COMPOSE_FILE.read_text()), dict)
    assert {"kafka", "redis", "topics", "bridge", "worker", "producer", "prometheus"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name


def test_every_variable_has_a_default_so_the_stack_runs_without_an_env_file() -> None:
    # load_compose() with no variables set raises on a ${VAR} without a default.
    assert load_compose({"KDB_GROUP_ID": "other"})["services"]["bridge"]["environment"]["BRIDGE_GROUP_ID"] == "other"


def test_the_fleet_runs_from_one_image_built_from_this_repository() -> None:
    assert set(OURS) == {"topics", "bridge", "worker", "producer"}
    assert len({SERVICES[name]["image"] for name in OURS}) == 1
    for name in OURS:
        assert SERVICES[name]["build"] in (".", {"context": "."}), name


def test_no_service_has_a_fixed_container_name_and_workers_publish_no_host_port() -> None:
    # Both would make `docker compose up --scale worker=N` fail.
    assert [name for name, service in SERVICES.items() if "container_name" in service] == []
    assert published_ports(SERVICES["worker"]) == []


@pytest.mark.parametrize("name", ["topics", "bridge", "worker", "producer"])
def test_each_command_is_a_real_command_of_the_project(name: str) -> None:
    argv = service_argv(SERVICES[name])
    program, args = argv[0], argv[1:]
    if program == "kafka-dramatiq-bridge":
        assert program in scripts()
        parsed = parse(bridge_parser(), args)
        modules = parsed.modules
    elif program == "dramatiq":
        assert any(e.name == "dramatiq" for e in importlib.metadata.entry_points(group="console_scripts"))
        parsed = parse(dramatiq.cli.make_argument_parser(), args)
        modules = [parsed.broker.partition(":")[0], *parsed.modules]
    elif program == "python":
        assert args[0] == "-m", argv
        module = load_standalone(args[1])
        assert hasattr(module, "parser"), f"{args[1]} has no parser() to check its arguments with"
        parse(module.parser(), args[2:])
        modules = [args[1]]
    else:
        pytest.fail(f"{name}: unknown program {program!r}")
    for module_name in modules:
        assert module_file(module_name) is not None, f"{name}: no module {module_name} in the repository"


def test_the_bridge_runs_the_example_fleet_and_the_workers_import_the_same_modules() -> None:
    bridge = parse(bridge_parser(), service_argv(SERVICES["bridge"])[1:])
    worker = parse(dramatiq.cli.make_argument_parser(), service_argv(SERVICES["worker"])[1:])
    assert bridge.command == "run"
    assert set(bridge.modules) == {worker.broker.partition(":")[0], *worker.modules}


def test_every_bridge_variable_is_a_setting() -> None:
    unknown = [
        f"{service}: {variable}"
        for service, definition in SERVICES.items()
        for variable in service_env(definition)
        if variable.startswith("BRIDGE_") and variable.removeprefix("BRIDGE_").lower() not in Settings.model_fields
    ]
    assert unknown == []


def test_services_reach_kafka_and_redis_by_their_compose_names() -> None:
    advertised = service_env(SERVICES["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    for name in OURS:
        env = service_env(SERVICES[name])
        if "BRIDGE_BOOTSTRAP_SERVERS" in env:
            for server in env["BRIDGE_BOOTSTRAP_SERVERS"].split(","):
                assert f"://{server}" in advertised, f"{name}: {server} is not an advertised listener"
        if "BRIDGE_REDIS_URL" in env:
            host = re.match(r"rediss?://([^:/]+)", env["BRIDGE_REDIS_URL"])
            assert host is not None and host.group(1) in SERVICES, f"{name}: {env['BRIDGE_REDIS_URL']}"


def test_the_bridge_port_is_the_same_everywhere() -> None:
    bridge = SERVICES["bridge"]
    env = service_env(bridge)
    port = int(env["BRIDGE_HTTP_PORT"])
    assert env["BRIDGE_HTTP_HOST"] == "0.0.0.0"  # reachable from the host and from Prometheus
    ports = published_ports(bridge)
    assert ports, "the bridge publishes no port"
    assert {container for _, container in ports} == {port}
    check = " ".join(bridge["healthcheck"]["test"])
    urls = re.findall(r"http://(?:localhost|127\.0\.0\.1):(\d+)(/\w+)", check)
    assert urls == [(str(port), "/readyz")]
    assert f"{port}" in exposed_ports()


class _ComposeLoader(yaml.SafeLoader):
    """A safe loader that reads compose's ``!override`` merge tag as the value it carries."""


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!override", _override)


def test_the_scale_override_publishes_only_the_bridge_container_port() -> None:
    override = yaml.load(SCALE_OVERRIDE.read_text(), Loader=_ComposeLoader)
    assert set(override["services"]) == {"bridge"}
    assert set(override["services"]["bridge"]) == {"ports"}
    assert "ports: !override" in SCALE_OVERRIDE.read_text()  # a plain list would be added to the fixed port
    port = int(service_env(SERVICES["bridge"])["BRIDGE_HTTP_PORT"])
    assert published_ports(override["services"]["bridge"]) == [(None, port)]


def test_the_bridge_healthcheck_is_valid_python_without_curl() -> None:
    test = SERVICES["bridge"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "<healthcheck>", "exec")


def test_dependencies_exist_and_wait_for_health_where_there_is_a_health_check() -> None:
    for name, service in SERVICES.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dependency: {"condition": "service_started"} for dependency in depends}
        for dependency, spec in depends.items():
            assert dependency in SERVICES, f"{name} depends on undefined {dependency}"
            condition = spec.get("condition", "service_started")
            target = SERVICES[dependency]
            if "healthcheck" in target:
                assert condition == "service_healthy", f"{name} -> {dependency}: {condition}"
            elif condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{dependency} is waited for but restarts"
            else:
                assert condition == "service_started", f"{name} -> {dependency}: {condition}"


def test_the_bridge_starts_after_the_topics_exist() -> None:
    depends = SERVICES["bridge"]["depends_on"]
    assert depends["topics"]["condition"] == "service_completed_successfully"
    assert depends["kafka"]["condition"] == depends["redis"]["condition"] == "service_healthy"


def test_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
            else:
                assert (REPO / source).resolve().exists(), f"{name}: {source} does not exist"


def test_redis_persists_with_append_only_file() -> None:
    redis = SERVICES["redis"]
    assert service_argv(redis)[:3] == ["redis-server", "--appendonly", "yes"]
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])


#: Seconds a graceful stop of the bridge may need after its drain: the final synchronous commit,
#: the last report to the ledger and leaving the group.
BRIDGE_STOP_MARGIN = 10.0


def bridge_worst_case_stop(env: dict[str, str]) -> float:
    """The longest a graceful stop of the bridge takes: every wait of the stop (the drain of
    dispatched records, the revoke of its partitions) shares one deadline of
    BRIDGE_SHUTDOWN_TIMEOUT, then the final commit and leaving the group need a margin."""
    shutdown = float(env.get("BRIDGE_SHUTDOWN_TIMEOUT", Settings.model_fields["shutdown_timeout"].default))
    return shutdown + BRIDGE_STOP_MARGIN


def test_the_bridge_stop_grace_period_exceeds_its_worst_case_graceful_stop() -> None:
    bridge = SERVICES["bridge"]
    worst = bridge_worst_case_stop(service_env(bridge))
    assert duration(bridge["stop_grace_period"]) > worst, "Docker would kill a bridge still stopping gracefully"


def test_the_grace_check_follows_a_raised_shutdown_timeout() -> None:
    # The check reads the stack's own setting: raising the timeout alone must fail it.
    bridge = SERVICES["bridge"]
    raised = {**service_env(bridge), "BRIDGE_SHUTDOWN_TIMEOUT": str(duration(bridge["stop_grace_period"]))}
    assert duration(bridge["stop_grace_period"]) <= bridge_worst_case_stop(raised)


def test_every_image_from_a_registry_is_pinned_to_a_release() -> None:
    # A floating tag (redis:7, latest) brings a new version with the next pull.
    floating = {
        name: service["image"]
        for name, service in SERVICES.items()
        if "build" not in service
        and not re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+(-[\w.]+)?(@sha256:[0-9a-f]{64})?", service["image"])
    }
    assert floating == {}


def test_graceful_stops_of_the_workers_fit_in_their_stop_grace_period() -> None:
    worker = SERVICES["worker"]
    parsed = parse(dramatiq.cli.make_argument_parser(), service_argv(worker)[1:])
    assert duration(worker["stop_grace_period"]) >= parsed.worker_shutdown_timeout / 1000 + 10


def test_workers_export_dramatiq_prometheus_metrics() -> None:
    env = service_env(SERVICES["worker"])
    assert env["TASKS_PROMETHEUS"] == "1"
    assert env["dramatiq_prom_host"] == "0.0.0.0"
    assert env["dramatiq_prom_port"] in exposed_ports()
    assert env["PROMETHEUS_MULTIPROC_DIR"] == env["dramatiq_prom_db"]
    assert env["dramatiq_prom_db"] in SERVICES["worker"].get("tmpfs", [])
    assert "TASKS_PROMETHEUS" not in service_env(SERVICES["bridge"])


def test_prometheus_scrapes_services_and_ports_defined_in_compose() -> None:
    prometheus = SERVICES["prometheus"]
    assert f"./{PROMETHEUS_CONFIG.relative_to(REPO)}:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    ports = {
        "bridge": int(service_env(SERVICES["bridge"])["BRIDGE_HTTP_PORT"]),
        "worker": int(service_env(SERVICES["worker"])["dramatiq_prom_port"]),
    }
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "compose's DNS answers A records, not SRV"
            scraped.update({name: sd["port"] for name in sd["names"]})
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                scraped[host] = int(port)
    assert scraped == ports


def test_the_image_is_slim_runs_as_non_root_and_exposes_the_metrics_ports() -> None:
    instructions = dockerfile_instructions()
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.\d+-slim(-\w+)?( AS \w+)?", base, re.I) for base in bases)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert {"9400", "9191"} <= exposed_ports()
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "pip install ." in runs
    copies = [args.split() for keyword, args in instructions if keyword == "COPY"]
    assert any("tasks" in words[:-1] for words in copies), "the example fleet is not in the image"
    default = json.loads(next(args for keyword, args in reversed(instructions) if keyword == "CMD"))
    assert default[0] in scripts()


def test_the_build_context_leaves_out_local_state_but_not_what_the_image_needs() -> None:
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".cache", "tests"} <= ignored
    assert not {"bridge", "tasks", "pyproject.toml", "README.md"} & ignored


@pytest.mark.parametrize("enabled", [False, True])
def test_the_example_fleet_adds_dramatiq_prometheus_middleware_only_when_asked(enabled: bool, tmp_path: Path) -> None:
    # A subprocess: importing tasks sets the global broker and registers handlers.
    env = {**os.environ, "PYTHONPATH": str(REPO), "BRIDGE_REDIS_URL": "redis://127.0.0.1:1/0",
           "dramatiq_prom_db": str(tmp_path)}
    env.pop("TASKS_PROMETHEUS", None)
    if enabled:
        env["TASKS_PROMETHEUS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", "import tasks; print(' '.join(type(m).__name__ for m in tasks.broker.middleware))"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert ("Prometheus" in result.stdout.split()) is enabled
