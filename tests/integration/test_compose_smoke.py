"""The compose stack's commands, run here as local processes against the test session's services.

No container engine is needed: each service's command and environment come from
docker-compose.yml, with the compose host names pointed at the test Kafka and Redis and the
listening ports moved to free ones. What runs is what the containers would run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq.cli
import pytest
import redis

from devstack import DramatiqWorkers, free_ports
from devstack.process import tail
from tests.support.bridge_proc import REPO, BridgeProcess
from tests.support.compose import load_compose, service_argv, service_env
from tests.support.http import get
from tests.support.pipeline import Pipeline
from tests.support.services import KafkaEndpoint, RedisEndpoint
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

# The example fleet's topics are fixed by its handlers; a fresh consumer group starts at the
# earliest offset, so records other runs left there are processed too and checked the same way.
TOPICS = ["orders", "payments", "audit-events", "page-views"]
PRODUCED = 300


def answer(url: str) -> str | None:
    """The body of a 200 answer, else None."""
    status, body = get(url)
    return body if status == 200 else None


def local_env(service: dict[str, Any], kafka: KafkaEndpoint, redis_url: str, **overrides: str) -> dict[str, str]:
    """The service's compose environment with the compose host names pointed at the test services."""
    env = {}
    for name, value in service_env(service).items():
        value = value.replace("redis://redis:6379/0", redis_url).replace("kafka:9092", kafka.bootstrap_servers)
        assert "redis://redis" not in value and "kafka:" not in value, f"{name}={value} still names a compose host"
        env[name] = value
    return {**env, **overrides, "PYTHONPATH": str(REPO)}


def run_module(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert argv[:2] == ["python", "-m"], argv
    return subprocess.run([sys.executable, *argv[1:]], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def caught_up(pipeline: Pipeline) -> Callable[[], dict[tuple[str, int], int] | None]:
    def check() -> dict[tuple[str, int], int] | None:
        ends = pipeline.ends()
        committed = pipeline.committed()
        # A partition no record went to has nothing to commit (its committed offset stays unset).
        behind = {tp: (committed[tp], end) for tp, end in ends.items() if max(committed[tp], 0) < end}
        return None if behind else ends

    return check


def test_the_compose_services_move_records_end_to_end_and_stop_cleanly(
    kafka: KafkaEndpoint, redis_server: RedisEndpoint, redis_client: redis.Redis,
    pipeline_factory: Callable[..., Pipeline], tmp_path: Path,
) -> None:
    pipeline = pipeline_factory(TOPICS)  # only for its unique group and its offset queries
    compose = load_compose({
        "KDB_GROUP_ID": pipeline.group,
        "KDB_PRODUCER_COUNT": str(PRODUCED),
        "KDB_PRODUCER_RATE": "1000",
    })
    services = compose["services"]
    http_port, prom_port = free_ports(2)
    prom_db = tmp_path / "prometheus"
    prom_db.mkdir()

    # topics: a one-shot that must succeed, and succeed again when everything exists.
    topics_env = local_env(services["topics"], kafka, redis_server.url)
    for _ in range(2):
        result = run_module(service_argv(services["topics"]), topics_env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert set(result.stdout.split()) == {f"{topic}:" for topic in TOPICS} | {"exists"}

    worker_argv = service_argv(services["worker"])
    assert worker_argv[0] == "dramatiq"
    parsed = dramatiq.cli.make_argument_parser().parse_args(worker_argv[1:])
    assert worker_argv[1] == parsed.broker
    workers = DramatiqWorkers(
        [parsed.broker], processes=parsed.processes, threads=parsed.threads, extra_args=worker_argv[2:],
        env={**os.environ, **local_env(
            services["worker"], kafka, redis_server.url,
            dramatiq_prom_host="127.0.0.1", dramatiq_prom_port=str(prom_port),
            dramatiq_prom_db=str(prom_db), PROMETHEUS_MULTIPROC_DIR=str(prom_db),
        )},
        cwd=REPO, log_path=tmp_path / "worker.log",
    )

    bridge_argv = service_argv(services["bridge"])
    assert bridge_argv[:2] == ["kafka-dramatiq-bridge", "run"]
    bridge = BridgeProcess(
        bridge_argv[2:],
        local_env(services["bridge"], kafka, redis_server.url, BRIDGE_HTTP_HOST="127.0.0.1",
                  BRIDGE_HTTP_PORT=str(http_port)),
        log_path=tmp_path / "bridge.log",
    )
    producer: subprocess.Popen[bytes] | None = None
    try:
        workers.start()
        bridge.start()
        producer_argv = service_argv(services["producer"])
        assert producer_argv[:2] == ["python", "-m"]
        producer = subprocess.Popen(
            [sys.executable, *producer_argv[1:]],
            env={**os.environ, **local_env(services["producer"], kafka, redis_server.url)}, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        output, _ = producer.communicate(timeout=60)
        assert producer.returncode == 0, output.decode()
        assert f"produced {PRODUCED} records" in output.decode()

        ends = wait_until(caught_up(pipeline), 120, interval=0.5,
                          message=lambda: f"committed offsets never reached the end offsets\n{tail(bridge.log_path)}")
        assert sum(ends.values()) >= PRODUCED
        kinds = ("orders", "payments", "audit", "page_views")
        handled = sum(int(redis_client.get(f"tasks:{kind}:count") or 0) for kind in kinds)
        assert handled >= sum(ends.values())  # at least once

        base = f"http://127.0.0.1:{http_port}"
        status, body = get(f"{base}/metrics")
        assert status == 200, body
        assert "kafka_dramatiq_bridge_" in body
        wait_until(lambda: get(f"{base}/readyz")[0] == 200, 30, interval=0.5,
                   message=lambda: f"/readyz: {get(f'{base}/readyz')}")
        assert get(f"{base}/livez")[0] == 200

        # The container's own health check, pointed at this bridge's port.
        check = services["bridge"]["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"]
        code = [arg.replace(":9400/", f":{http_port}/") for arg in check[2:]]
        result = subprocess.run([sys.executable, *code], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr

        # What Prometheus scrapes from each worker container.
        body = wait_until(lambda: answer(f"http://127.0.0.1:{prom_port}/metrics"), 30, interval=0.5,
                          message="the workers' Prometheus exposition never answered")
        assert "dramatiq_messages_total" in body

        assert bridge.stop(timeout=90) == 0, tail(bridge.log_path)
        assert workers.stop(timeout=60) == 0, tail(workers.log_path)
        assert caught_up(pipeline)() == ends  # the final commit kept everything
    finally:
        if producer is not None and producer.poll() is None:
            producer.send_signal(signal.SIGTERM)
            producer.wait(30)
        bridge.kill()
        workers.stop(timeout=10)


def test_the_compose_producer_runs_until_stopped_and_flushes_on_sigterm(
    kafka: KafkaEndpoint, redis_server: RedisEndpoint
) -> None:
    # Default variables: the stack's producer runs until `docker stop` sends SIGTERM.
    services = load_compose()["services"]
    argv = service_argv(services["producer"])
    assert argv[argv.index("--count") + 1] == "0"
    topics = run_module(service_argv(services["topics"]), local_env(services["topics"], kafka, redis_server.url))
    assert topics.returncode == 0, topics.stdout + topics.stderr
    producer = subprocess.Popen(
        [sys.executable, *argv[1:]], env={**os.environ, **local_env(services["producer"], kafka, redis_server.url)},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            producer.wait(3)
        producer.send_signal(signal.SIGTERM)
        output = producer.communicate(timeout=60)[0].decode()
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    assert producer.returncode == 0, output
    assert "records in" in output and "Traceback" not in output
