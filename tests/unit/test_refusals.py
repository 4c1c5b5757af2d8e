"""Refusals that retrying cannot cure become fatal errors naming the cause and the remedy."""

from __future__ import annotations

import pytest
import redis
from confluent_kafka import KafkaError

from bridge.denied import access_denied
from bridge.errors import FatalError, KafkaAccessDenied, LedgerAccessDenied, LedgerUnavailable
from bridge.ledger import LedgerError
from bridge.ledger.connection import failure
from bridge.settings import load_settings

SETTINGS = load_settings(bootstrap_servers="kafka-1:9094", group_id="orders-bridge",
                         kafka={"sasl.username": "orders", "sasl.password": "secret"})


@pytest.mark.parametrize(
    ("code", "named"),
    [
        (KafkaError._AUTHENTICATION, "rejected the credentials of user 'orders'"),
        (KafkaError._SSL, "ssl.ca.location"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "topic 'orders': the bridge's principal needs the READ and DESCRIBE"),
        (KafkaError.GROUP_AUTHORIZATION_FAILED, "consumer group 'orders-bridge'"),
    ],
)
def test_each_refusal_names_its_cause_and_exits_with_code_6(code: int, named: str) -> None:
    denied = access_denied(KafkaError(code, "refused"), SETTINGS, "orders")
    assert isinstance(denied, KafkaAccessDenied) and denied.exit_code == 6
    assert named in str(denied) and "kafka-1:9094" in str(denied)
    assert "secret" not in str(denied)


@pytest.mark.parametrize("code", [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                                  KafkaError.NOT_COORDINATOR, KafkaError.UNKNOWN_TOPIC_OR_PART])
def test_what_retrying_can_cure_is_not_a_refusal(code: int) -> None:
    assert access_denied(KafkaError(code, "transient"), SETTINGS) is None


def test_a_redis_permission_refusal_is_fatal_and_an_outage_is_not() -> None:
    refused = failure("bumping epochs", redis.exceptions.NoPermissionError("this user has no permissions"))
    assert isinstance(refused, LedgerAccessDenied) and isinstance(refused, FatalError)
    assert not isinstance(refused, LedgerUnavailable), "fatal only: waiting cannot grant a permission"
    assert isinstance(refused, LedgerError), "workers catch it with every ledger failure (logged, counted)"
    assert refused.exit_code == 7 and "docs/security.md" in str(refused)
    in_script = failure("staging", redis.exceptions.ResponseError("NOPERM this user has no permissions to run 'x'"))
    assert isinstance(in_script, LedgerAccessDenied)
    down = failure("heartbeat", redis.exceptions.ConnectionError("Connection refused"))
    assert type(down) is LedgerUnavailable


def test_a_refusal_inside_a_script_names_the_command_the_script_needed() -> None:
    import hashlib

    from bridge.ledger.scripts import failure as ledger_failure
    from bridge.ledger.scripts import script as _script

    source = _script("bump")
    sha = hashlib.sha1(source.encode()).hexdigest()
    line = next(n for n, text in enumerate(source.splitlines(), 1) if "PERSIST" in text)
    refused = ledger_failure("bumping epochs", redis.exceptions.ResponseError(
        f"The user executing the script can't run this command or subcommand script: {sha}, on @user_script:{line}."
    ))
    assert isinstance(refused, LedgerAccessDenied)
    assert "needs the persist command" in str(refused)
