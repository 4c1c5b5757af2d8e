"""The ledger on a Redis ACL user restricted to the rule in docs/security.md, over TLS.

The rule is read from the document, so the document cannot drift from what was tested. The task
broker and the test's history use the default user on the plain port of the same server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trustme

from devstack import RedisServer
from devstack.redis import RedisTls
from tests.integration.test_bridge import assert_complete, run_to_end
from tests.support.bridge_proc import REPO
from tests.support.kafka import produce_keyed, read_raw
from tests.support.pipeline import Pipeline

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "security.md"
PASSWORD = "ledger-acl-secret"


def documented_rule() -> list[str]:
    found = re.search(r"^ACL SETUSER kdb-ledger .*$", DOC.read_text(), re.MULTILINE)
    assert found, f"{DOC} has no 'ACL SETUSER kdb-ledger' line"
    return shlex.split(found.group(0).replace(">CHANGE-ME", f">{PASSWORD}"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    data = tmp_path_factory.mktemp("tls-redis")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(data / "cert.pem"))
    cert.private_key_pem.write_to_path(str(data / "key.pem"))
    ca.cert_pem.write_to_path(str(data / "ca.pem"))
    server = RedisServer(data / "redis", tls=RedisTls(data / "cert.pem", data / "key.pem", data / "ca.pem"))
    server.start(timeout=30)
    try:
        redis.Redis.from_url(server.url).execute_command(*documented_rule())
        yield server, data / "ca.pem"
    finally:
        server.stop()


def ledger_url(server: RedisServer, ca: Path) -> str:
    return f"rediss://kdb-ledger:{PASSWORD}@127.0.0.1:{server.tls_port}/0?ssl_ca_certs={ca}"


def test_the_documented_rule_denies_everything_else(tls_redis: tuple[RedisServer, Path]) -> None:
    server, ca = tls_redis
    client = redis.Redis.from_url(ledger_url(server, ca))
    assert client.ping()
    client.hset("kdb:probe", "a", "1")
    for forbidden in (lambda: client.get("dramatiq:default"), lambda: client.flushall(),
                      lambda: client.config_get("*"), lambda: client.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    with pytest.raises(redis.exceptions.ConnectionError):
        # The TLS port refuses a plain-text client.
        redis.Redis(host="127.0.0.1", port=server.tls_port, socket_timeout=2).ping()


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_the_fleet_runs_with_the_ledger_on_the_restricted_user_over_tls(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str],
    tls_redis: tuple[RedisServer, Path], ordering: str,
) -> None:
    server, ca = tls_redis
    history = redis.Redis.from_url(server.url)
    history.delete("kdb-test:events")
    topic = topic_factory(3)
    pipeline = pipeline_factory(
        [topic], redis_url=ledger_url(server, ca), KDB_TEST_BROKER_URL=server.url, KDB_TEST_ORDERING=ordering,
        KDB_TEST_FAIL_KEYS="7", KDB_TEST_MAX_RETRIES="1",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 900, key=lambda i: str(i % 20))
    pipeline.start_workers(processes=2, threads=4)
    bridge = pipeline.start_bridge()
    report = run_to_end(pipeline, history, ordering)
    assert_complete(report, pipeline.ends())
    assert report.order_violations == [] and report.overlaps == []
    assert len(read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", 45)) == 45
    logs = bridge.log + "".join(w.log_path.read_text() for w in pipeline.workers)
    assert "noperm" not in logs.lower() and "no permissions" not in logs.lower()
    assert "listening for finished records failed" not in logs
    assert PASSWORD not in logs
    status = subprocess.run(
        [sys.executable, "-m", "bridge", "status", "tests.support.bridge_actors", "--json"],
        env={**os.environ, **pipeline.env, "PYTHONPATH": str(REPO)}, cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert all(row["lag"] == 0 for row in json.loads(status.stdout))
    assert PASSWORD not in status.stdout + status.stderr


def test_a_ledger_user_missing_a_permission_stops_the_bridge_with_exit_code_7(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str],
    tls_redis: tuple[RedisServer, Path],
) -> None:
    server, ca = tls_redis
    rule = [part for part in documented_rule() if part != "+persist"]  # the epoch bump needs it
    assert len(rule) == len(documented_rule()) - 1
    rule[2] = "kdb-partial"
    redis.Redis.from_url(server.url).execute_command(*rule)
    topic = topic_factory(1)
    url = f"rediss://kdb-partial:{PASSWORD}@127.0.0.1:{server.tls_port}/0?ssl_ca_certs={ca}"
    pipeline = pipeline_factory([topic], redis_url=url, KDB_TEST_BROKER_URL=server.url)
    bridge = pipeline.start_bridge()
    assert bridge.proc is not None
    assert bridge.proc.wait(60) == 7, bridge.log[-3000:]
    assert "docs/security.md" in bridge.log and "persist" in bridge.log
    assert PASSWORD not in bridge.log


def test_the_operator_commands_run_on_the_restricted_user(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str],
    tls_redis: tuple[RedisServer, Path],
) -> None:
    server, ca = tls_redis
    topic = topic_factory(2)
    pipeline = pipeline_factory([topic], redis_url=ledger_url(server, ca), KDB_TEST_BROKER_URL=server.url)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 10)
    steps = [(["pause", topic], 0), (["status", "tests.support.bridge_actors", "--json"], 0), (["resume", topic], 0),
             (["skip", f"{topic}:0:0"], 8), (["reset-offsets", topic, "--to-latest", "--dry-run"], 0),
             (["reset-offsets", topic, "--to-latest"], 0)]
    for args, code in steps:
        result = subprocess.run(
            [sys.executable, "-m", "bridge", *args], env={**os.environ, **pipeline.env, "PYTHONPATH": str(REPO)},
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == code, f"{args}: {result.stderr}"
        output = result.stdout + result.stderr
        assert "no permissions" not in output.lower() and PASSWORD not in output
    assert sum(pipeline.committed().values()) == 10
    audit = redis.Redis.from_url(server.url).lrange(f"kdb:{{{pipeline.group}}}:audit", 0, -1)
    assert [json.loads(entry)["ok"] for entry in audit] == [True, True, False, True, True]
