"""Kafka with authentication and authorization: SASL/SCRAM-SHA-512 and TLS listeners, ACLs.

A broker of its own (the session's broker has no security) with a throwaway CA. The bridge and
its dead-letter producer connect through settings alone; a refusal (wrong password, untrusted
certificate, missing ACL) stops the bridge with exit code 6 and one error naming the cause,
before anything is committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from cryptography.hazmat.primitives import serialization

from devstack import KafkaServer
from devstack.kafka import Security
from tests.integration.test_bridge import assert_complete, run_to_end
from tests.support.bridge_proc import REPO
from tests.support.kafka import create_topic, produce_keyed, read_raw, unique_name
from tests.support.pipeline import Pipeline

pytestmark = pytest.mark.integration

PASSWORD = "scram-secret-for-tests"
#: Topic and group names of these tests start with it; ACLs are granted on the prefix.
PREFIX = "sec-"


@dataclass(frozen=True)
class SecureKafka:
    server: KafkaServer
    admin: AdminClient
    ca: Path
    other_ca: Path


def _grant(admin: AdminClient, user: str, *grants: tuple[ResourceType, AclOperation]) -> None:
    bindings = [
        AclBinding(kind, PREFIX, ResourcePatternType.PREFIXED, f"User:{user}", "*", operation, AclPermissionType.ALLOW)
        for kind, operation in grants
    ]
    for future in admin.create_acls(bindings).values():
        future.result(30)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    data = tmp_path_factory.mktemp("secure-kafka")
    ca, stranger_ca = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    keystore = data / "server.pem"
    keystore.write_bytes(pkcs8 + b"".join(c.bytes() for c in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(data / "ca.pem"))
    stranger_ca.cert_pem.write_to_path(str(data / "other-ca.pem"))
    server = KafkaServer(data / "kafka", security=Security(keystore))
    server.start(timeout=120)
    try:
        admin = AdminClient({"bootstrap.servers": server.bootstrap_servers})
        users = ("bridge", "stranger", "nogroup")
        upserts = [
            UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
                                         PASSWORD.encode())
            for user in users
        ]
        for future in admin.alter_user_scram_credentials(upserts).values():
            future.result(30)
        # The minimal set (docs/security.md): READ and DESCRIBE on the topics, READ on the group,
        # WRITE and DESCRIBE on the dead-letter topics; here on the test prefix.
        _grant(admin, "bridge", (ResourceType.TOPIC, AclOperation.READ), (ResourceType.TOPIC, AclOperation.DESCRIBE),
               (ResourceType.TOPIC, AclOperation.WRITE), (ResourceType.GROUP, AclOperation.READ))
        _grant(admin, "nogroup", (ResourceType.TOPIC, AclOperation.READ), (ResourceType.TOPIC, AclOperation.DESCRIBE))
        yield SecureKafka(server, admin, data / "ca.pem", data / "other-ca.pem")
    finally:
        server.stop()


def scram(user: str = "bridge", password: str = PASSWORD) -> dict[str, str]:
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user, "sasl.password": password}


def secure_pipeline(pipeline_factory: Callable[..., Pipeline], secure: SecureKafka, partitions: int = 2,
                    **options: str) -> tuple[Pipeline, str]:
    topic = unique_name(PREFIX + "t")
    create_topic(secure.admin, topic, partitions)
    create_topic(secure.admin, f"{topic}.dlq", 1)
    pipeline = pipeline_factory([topic], kafka_endpoint=secure.server, **options)
    pipeline.env["BRIDGE_GROUP_ID"] = pipeline.group = unique_name(PREFIX + "group")
    return pipeline, topic


def committed(secure: SecureKafka, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": secure.server.bootstrap_servers, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return [tp.offset for tp in consumer.committed(tps, timeout=10)]
    finally:
        consumer.close()


def test_over_scram_with_the_minimal_acls_records_flow_and_failures_reach_the_dead_letter_topic(
    pipeline_factory: Callable[..., Pipeline], secure: SecureKafka, redis_client: redis.Redis
) -> None:
    pipeline, topic = secure_pipeline(pipeline_factory, secure, KDB_TEST_ORDERING="key", KDB_TEST_FAIL_KEYS="3")
    env = {"BRIDGE_BOOTSTRAP_SERVERS": secure.server.sasl_bootstrap_servers, "BRIDGE_KAFKA": json.dumps(scram())}
    produce_keyed(secure.server.bootstrap_servers, topic, 400, key=lambda i: str(i % 10))
    pipeline.start_workers(processes=1, threads=8)
    pipeline.start_bridge(env=env)
    report = run_to_end(pipeline, redis_client, "key")
    assert_complete(report, pipeline.ends())
    dead = read_raw(secure.server.bootstrap_servers, f"{topic}.dlq", 40)
    assert len(dead) == 40 and {m.key() for m in dead} == {b"3"}, "written by the producer over SCRAM"
    status = subprocess.run(
        [sys.executable, "-m", "bridge", "status", "tests.support.bridge_actors", "--json"],
        env={**os.environ, **pipeline.env, **env, "PYTHONPATH": str(REPO)}, cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert {(r["topic"], r["partition"]): r["committed"] for r in rows} == pipeline.committed()
    assert PASSWORD not in status.stdout + status.stderr


def test_over_tls_verified_with_the_ca_records_flow(
    pipeline_factory: Callable[..., Pipeline], secure: SecureKafka, redis_client: redis.Redis
) -> None:
    pipeline, topic = secure_pipeline(pipeline_factory, secure, KDB_TEST_ORDERING="partition")
    produce_keyed(secure.server.bootstrap_servers, topic, 300)
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge(env={
        "BRIDGE_BOOTSTRAP_SERVERS": secure.server.ssl_bootstrap_servers,
        "BRIDGE_KAFKA": json.dumps({"security.protocol": "SSL", "ssl.ca.location": str(secure.ca)}),
    })
    report = run_to_end(pipeline, redis_client, "partition")
    assert_complete(report, pipeline.ends())
    assert report.duplicates == 0


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", "rejected the credentials of user 'bridge'"),
        ("untrusted certificate", "TLS with Kafka"),
        ("no topic acl", "denied access to topic"),
        ("no group acl", "denied access to consumer group"),
    ],
)
def test_a_refusal_stops_the_bridge_with_exit_code_6_one_error_and_no_commit(
    pipeline_factory: Callable[..., Pipeline], secure: SecureKafka, case: str, expected: str
) -> None:
    pipeline, topic = secure_pipeline(pipeline_factory, secure)
    produce_keyed(secure.server.bootstrap_servers, topic, 50)
    sasl = secure.server.sasl_bootstrap_servers
    settings = {
        "wrong password": (sasl, scram(password="not-the-password")),
        "untrusted certificate": (secure.server.ssl_bootstrap_servers,
                                  {"security.protocol": "SSL", "ssl.ca.location": str(secure.other_ca)}),
        "no topic acl": (sasl, scram("stranger")),
        "no group acl": (sasl, scram("nogroup")),
    }[case]
    pipeline.start_workers(processes=1, threads=2)
    bridge = pipeline.start_bridge(
        env={"BRIDGE_BOOTSTRAP_SERVERS": settings[0], "BRIDGE_KAFKA": json.dumps(settings[1])}
    )
    assert bridge.proc is not None
    code = bridge.proc.wait(90)
    log = bridge.log
    assert code == 6, log[-3000:]
    errors = [line for line in log.splitlines() if " ERROR bridge: " in line or " CRITICAL bridge: " in line]
    assert [line for line in errors if expected in line] == errors[-1:], errors
    assert len([line for line in errors if expected in line]) == 1, "one error, not a retry loop"
    assert committed(secure, pipeline.group, topic, 2) == [-1001, -1001], "nothing committed"
    assert "not-the-password" not in log and PASSWORD not in log
