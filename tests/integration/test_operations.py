"""Operating the bridge against real services: metrics, health checks, secrets kept out of output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from devstack import RedisServer, free_port
from tests.integration.test_bridge import wait_committed_to_end
from tests.support import http
from tests.support.bridge_proc import REPO
from tests.support.kafka import produce_keyed
from tests.support.pipeline import Pipeline
from tests.support.services import KafkaEndpoint, RedisEndpoint
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int | None, str]:
    return http.get(f"http://127.0.0.1:{port}{path}")


def scrape(port: int) -> Samples:
    code, text = get(port, "/metrics")
    assert code == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def when(fetch: Callable[[], T], ok: Callable[[T], bool]) -> T | None:
    value = fetch()
    return value if ok(value) else None


def per_partition(samples: Samples, name: str) -> dict[tuple[str, int], float]:
    found = {}
    for (metric, labels), value in samples.items():
        if metric == f"kafka_dramatiq_bridge_{name}":
            found[(dict(labels)["topic"], int(dict(labels)["partition"]))] = value
    return found


def per_topic(samples: Samples, name: str) -> dict[str, float]:
    return {
        dict(labels)["topic"]: value
        for (metric, labels), value in samples.items()
        if metric == f"kafka_dramatiq_bridge_{name}"
    }


def test_metrics_show_the_lag_then_its_drain_to_zero_and_counters_match_the_records(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str]
) -> None:
    orders, audit = topic_factory(3), topic_factory(2)
    pipeline = pipeline_factory([orders, audit], KDB_TEST_ORDERING="key")
    produce_keyed(pipeline.kafka.bootstrap_servers, orders, 1200)
    produce_keyed(pipeline.kafka.bootstrap_servers, audit, 500)
    port = free_port()
    # No worker yet: everything is dispatched and nothing finishes, so the lag stays visible.
    bridge = pipeline.start_bridge(env={"BRIDGE_HTTP_PORT": str(port), "BRIDGE_HEALTH_MAX_RECORD_AGE": "3"})
    wait_until(lambda: get(port, "/readyz")[0] == 200, 60, interval=0.2, message=lambda: bridge.log[-2000:])
    ends = pipeline.ends()
    # End offsets come from fetch responses: wait until every partition has had one.
    before = wait_until(
        lambda: when(lambda: scrape(port), lambda s: per_partition(s, "partition_end_offset") == ends),
        60, interval=0.2, message="the end offsets never showed up",
    )
    assert per_partition(before, "partition_lag_records") == ends, "nothing done yet: lag is the whole partition"
    assert sum(per_partition(before, "partition_in_flight_records").values()) > 0
    assert before[("kafka_dramatiq_bridge_assigned_partitions", ())] == 5
    _, body = wait_until(lambda: when(lambda: get(port, "/livez"), lambda r: r[0] == 503), 30, interval=0.2,
                         message="a record unfinished past BRIDGE_HEALTH_MAX_RECORD_AGE kept /livez at 200")
    assert "BRIDGE_HEALTH_MAX_RECORD_AGE" in body

    pipeline.start_workers(processes=1, threads=8)
    committed = wait_committed_to_end(pipeline)
    drained = dict.fromkeys(ends, 0)
    after = wait_until(
        lambda: when(lambda: scrape(port), lambda s: per_partition(s, "partition_lag_records") == drained),
        30, interval=0.2, message="the lag metric never reached 0",
    )
    assert get(port, "/livez")[0] == 200
    assert per_partition(after, "partition_committed_offset") == committed
    assert per_partition(after, "partition_in_flight_records") == dict.fromkeys(ends, 0)
    assert per_topic(after, "records_done_total") == {orders: 1200, audit: 500}
    assert per_topic(after, "records_dispatched_total") == {orders: 1200, audit: 500}
    assert per_topic(after, "records_failed_total") == {}
    assert after[("kafka_dramatiq_bridge_rebalances_total", (("event", "assigned"),))] >= 1
    assert after[("kafka_dramatiq_bridge_commits_total", ())] >= 1
    assert after[("kafka_dramatiq_bridge_commit_duration_seconds_count", ())] >= 1
    assert after[("kafka_dramatiq_bridge_ledger_up", ())] == 1
    assert bridge.stop() == 0


def test_readiness_fails_while_redis_is_down_and_returns_after(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    store = RedisServer(tmp_path / "redis", aof=True)
    store.start()
    try:
        topic = topic_factory(2)
        pipeline = pipeline_factory([topic], redis_url=store.url, KDB_TEST_ORDERING="partition")
        produce_keyed(pipeline.kafka.bootstrap_servers, topic, 200)
        pipeline.start_workers(processes=1, threads=4)
        port = free_port()
        bridge = pipeline.start_bridge(env={"BRIDGE_HTTP_PORT": str(port), "BRIDGE_HEALTH_OUTAGE_TIMEOUT": "2"})
        wait_committed_to_end(pipeline)
        assert get(port, "/readyz") == (200, "ok\n")

        store.stop()
        _, body = wait_until(lambda: when(lambda: get(port, "/readyz"), lambda r: r[0] == 503), 60, interval=0.2,
                             message="/readyz stayed 200 with redis-server stopped")
        assert "BRIDGE_HEALTH_OUTAGE_TIMEOUT" in body
        assert get(port, "/livez")[0] == 200, "the loop still polls Kafka: no restart wanted"
        assert scrape(port)[("kafka_dramatiq_bridge_ledger_up", ())] == 0

        store.start()
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, interval=0.2, message="/readyz never recovered")
        assert scrape(port)[("kafka_dramatiq_bridge_ledger_up", ())] == 1
        produce_keyed(pipeline.kafka.bootstrap_servers, topic, 100)
        assert sum(wait_committed_to_end(pipeline).values()) == 300
        assert bridge.stop() == 0
    finally:
        pipeline.close()
        store.stop()


SECRETS = {
    "redis": "Redis-Secret-4471",
    "sasl": "Sasl-Secret-9182",
    "key": "KeyPassword-Secret-3310",
    "keystore": "Keystore-Secret-5521",
    "oauth": "OAuth-Secret-7741",
    "pem": "PemBody-Secret-6620",
}


def _run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), "BRIDGE_HTTP_PORT": "0", **env},
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def test_secrets_in_every_setting_that_holds_one_never_reach_logs_status_or_errors(
    kafka: KafkaEndpoint, redis_server: RedisEndpoint, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    topic = topic_factory(1)
    closed = free_port()
    kafka_secrets = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "bridge",
        "sasl.password": SECRETS["sasl"],
        "ssl.key.password": SECRETS["key"],
        "ssl.keystore.password": SECRETS["keystore"],
        "sasl.oauthbearer.client.secret": SECRETS["oauth"],
    }
    env = {
        "BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BRIDGE_GROUP_ID": f"secrets-{topic}",
        "BRIDGE_REDIS_URL": f"redis://bridge:{SECRETS['redis']}@127.0.0.1:{closed}/0",
        "BRIDGE_KAFKA": json.dumps(kafka_secrets),
        "BRIDGE_LOG_LEVEL": "DEBUG",
        "KDB_TEST_TOPICS": topic,
    }
    outputs: dict[str, str] = {}

    # run: SASL against a plaintext listener and a ledger nobody listens on; stopped after a while.
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "tests.support.bridge_actors"],
            env={**os.environ, "PYTHONPATH": str(REPO), "BRIDGE_HTTP_PORT": "0", **env},
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
        time.sleep(8)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    outputs["run"] = log.read_text()
    assert "cannot reach Kafka" in outputs["run"] or "Kafka" in outputs["run"], outputs["run"][-2000:]

    for name, args, extra in (
        ("status", ["status", "tests.support.bridge_actors", "--json"], {}),
        ("replay", ["replay", f"{topic}.dlq", "--limit", "1"], {}),
        ("status-flags", ["status", "tests.support.bridge_actors", "--redis-url",
                          f"redis://admin:{SECRETS['redis']}@127.0.0.1:{closed}/0",
                          "-X", f"sasl.password={SECRETS['sasl']}"], {"BRIDGE_KAFKA": "{}"}),
        # The plaintext listener with a working Redis: status gets to the ledger and prints rows.
        ("status-ok", ["status", "tests.support.bridge_actors", "--json", "--redis-url",
                       redis_server.url.replace("redis://", f"redis://default:{SECRETS['redis']}@", 1)],
         {"BRIDGE_KAFKA": json.dumps({"ssl.key.password": SECRETS["key"]})}),
        # A bad scheme is refused; the refusal must not echo the URL's password.
        ("invalid", ["status", "tests.support.bridge_actors"],
         {"BRIDGE_REDIS_URL": f"http://bridge:{SECRETS['redis']}@redis:6379/0"}),
        # An SSL key librdkafka cannot parse: its error names the property, never the value.
        ("bad-pem", ["run", "tests.support.bridge_actors"],
         {"BRIDGE_KAFKA": json.dumps({"security.protocol": "SSL", "ssl.key.pem": SECRETS["pem"],
                                      "ssl.certificate.pem": "not a certificate"})}),
    ):
        result = _run_cli(args, {**env, **extra}, timeout=90)
        outputs[name] = result.stdout + result.stderr
        assert result.returncode != 0 or name == "status-ok", (name, outputs[name][-2000:])
    assert '"partition": 0' in outputs["status-ok"]
    assert "invalid configuration" in outputs["invalid"] and "BRIDGE_REDIS_URL" in outputs["invalid"]
    for name, text in outputs.items():
        for secret in SECRETS.values():
            assert secret not in text, f"{name} printed a secret: {text[max(text.find(secret) - 300, 0):][:600]}"
    # The DEBUG lines with the settings and the consumer configuration hold every secret, masked.
    assert f"redis://bridge:***@127.0.0.1:{closed}/0" in outputs["run"]
    for name in kafka_secrets:
        if name.endswith(("password", "secret")):
            assert f"'{name}': '***'" in outputs["run"], name


def test_json_log_lines_parse_and_record_level_lines_carry_coordinates(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_FAIL_KEYS="poison",
                                BRIDGE_LOG_FORMAT="json")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 20, key=lambda i: "poison" if i == 7 else str(i))
    pipeline.start_workers(processes=1, threads=2)
    bridge = pipeline.start_bridge()
    wait_committed_to_end(pipeline)
    assert bridge.stop() == 0
    lines = [json.loads(line) for line in bridge.log.splitlines() if line.strip()]
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    failed = [entry for entry in lines if "final-failure" in entry["message"]]
    assert len(failed) == 1
    assert (failed[0]["topic"], failed[0]["partition"], failed[0]["offset"]) == (topic, 0, 7)
