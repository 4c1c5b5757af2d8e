"""Kafka refusals that retrying cannot cure: credentials, TLS and missing ACLs.

Each becomes a :class:`KafkaAccessDenied` that names the cause and the setting or ACL to fix;
the bridge stops with exit code 6 before it commits anything.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from .errors import KafkaAccessDenied
from .settings import Settings


def access_denied(error: KafkaError, settings: Settings, topic: str | None = None) -> KafkaAccessDenied | None:
    """The refusal ``error`` stands for, or None when it is something else."""
    code = error.code()
    where = f"Kafka at {settings.bootstrap_servers}"
    if code == KafkaError._AUTHENTICATION:
        user = settings.kafka.get("sasl.username")
        who = f" of user {user!r}" if user else ""
        return KafkaAccessDenied(
            f"{where} rejected the credentials{who} (sasl.mechanism, sasl.username and sasl.password in "
            f"BRIDGE_KAFKA): {error.str()}"
        )
    if code == KafkaError._SSL:
        return KafkaAccessDenied(
            f"TLS with {where} failed (check ssl.ca.location and the ssl.* certificate settings in "
            f"BRIDGE_KAFKA): {error.str()}"
        )
    if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        subject = f"topic {topic!r}" if topic else "a topic"
        return KafkaAccessDenied(
            f"{where} denied access to {subject}: the bridge's principal needs the READ and DESCRIBE "
            f"ACLs on every handler topic ({error.str()})"
        )
    if code == KafkaError.GROUP_AUTHORIZATION_FAILED:
        return KafkaAccessDenied(
            f"{where} denied access to consumer group {settings.group_id!r}: the bridge's principal needs "
            f"the READ ACL on it ({error.str()})"
        )
    if code == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
        return KafkaAccessDenied(f"{where} denied a cluster operation: {error.str()}")
    return None
