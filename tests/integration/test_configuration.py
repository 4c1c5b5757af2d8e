"""Bad configuration fails at start with one clear message naming the setting, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.bridge_proc import REPO
from tests.support.services import KafkaEndpoint, RedisEndpoint

RET_CONFIG = 2


def run_bridge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )


BASE = {"KDB_TEST_TOPICS": "some-topic", "BRIDGE_REDIS_URL": "redis://127.0.0.1:1/0"}


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), {"BRIDGE_WINDOW": "0"}, "BRIDGE_WINDOW"),
        ((), {"BRIDGE_GROUP_PROTOCOL": "eager"}, "BRIDGE_GROUP_PROTOCOL"),
        ((), {"BRIDGE_REDIS_URL": "http://localhost"}, "BRIDGE_REDIS_URL"),
        ((), {"BRIDGE_KAFKA": "not json"}, "BRIDGE_KAFKA"),
        (("-X", "enable.auto.commit=true"), {}, "enable.auto.commit"),
        (("-X", "auto.offset.reset=latest"), {}, "offset_reset"),
        (("-X", "novalue"), {}, "NAME=VALUE"),
        ((), {"BRIDGE_DRAIN_TIMEOUT": "400"}, "max.poll.interval.ms"),
        ((), {"KDB_TEST_ORDERING": "sorted"}, "ordering"),
        (("-X", "session.timeout.ms=6000"), {"BRIDGE_GROUP_PROTOCOL": "consumer"}, "session.timeout.ms"),
    ],
)
def test_an_invalid_setting_exits_with_code_2_naming_it(args: tuple[str, ...], env: dict[str, str], named: str) -> None:
    result = run_bridge("run", "tests.support.bridge_actors", *args, env={**BASE, **env})
    assert result.returncode == RET_CONFIG, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_a_module_that_fails_to_import_is_named() -> None:
    result = run_bridge("run", "no_such_module_here", env=BASE)
    assert result.returncode == RET_CONFIG
    assert "cannot import handler module 'no_such_module_here'" in result.stderr


def test_a_module_without_handlers_is_an_error() -> None:
    result = run_bridge("run", "json", env=BASE)
    assert result.returncode == RET_CONFIG
    assert "no @kafka_handler found in json" in result.stderr


@pytest.mark.integration
def test_an_unknown_kafka_property_is_named(kafka: KafkaEndpoint, redis_server: RedisEndpoint) -> None:
    env = {**BASE, "BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BRIDGE_REDIS_URL": redis_server.url}
    result = run_bridge("run", "tests.support.bridge_actors", "-X", "no.such.property=1", env=env)
    assert result.returncode == RET_CONFIG, result.stderr
    assert "no.such.property" in result.stderr


@pytest.mark.integration
def test_a_topic_that_does_not_exist_is_reported(kafka: KafkaEndpoint, redis_server: RedisEndpoint) -> None:
    env = {**BASE, "BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BRIDGE_REDIS_URL": redis_server.url,
           "KDB_TEST_TOPICS": "topic-that-was-never-created"}
    result = run_bridge("run", "tests.support.bridge_actors", env=env)
    assert result.returncode == RET_CONFIG, result.stderr
    assert "topic-that-was-never-created do not exist" in result.stderr
    assert "BRIDGE_WAIT_FOR_TOPICS" in result.stderr
