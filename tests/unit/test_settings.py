"""Settings: defaults, environment, validation errors that name the setting, forced Kafka properties."""

from __future__ import annotations

import pytest

from bridge.consumer import FORCED, consumer_config, is_cooperative
from bridge.errors import ConfigurationError
from bridge.settings import load_settings


def test_defaults_match_the_documented_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BRIDGE_BOOTSTRAP_SERVERS", "BRIDGE_REDIS_URL", "BRIDGE_GROUP_ID", "BRIDGE_KAFKA"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.bootstrap_servers == "localhost:9092"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.group_id == "kafka-dramatiq-bridge"


def test_environment_is_read_with_the_bridge_prefix_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_GROUP_ID", "from-env")
    monkeypatch.setenv("BRIDGE_BOOTSTRAP_SERVERS", "k1:9092")
    monkeypatch.setenv("BRIDGE_KAFKA", '{"session.timeout.ms": 10000}')
    settings = load_settings(group_id="from-flag")
    assert settings.group_id == "from-flag"
    assert settings.bootstrap_servers == "k1:9092"
    assert settings.kafka == {"session.timeout.ms": "10000"}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"redis_url": "http://x"}, "BRIDGE_REDIS_URL"),
        ({"window": 0}, "BRIDGE_WINDOW"),
        ({"group_protocol": "eager"}, "BRIDGE_GROUP_PROTOCOL"),
        ({"commit_interval": -1}, "BRIDGE_COMMIT_INTERVAL"),
        ({"kafka": {"enable.auto.commit": "true"}}, "enable.auto.commit"),
        ({"kafka": {"auto.offset.reset": "latest"}}, "offset_reset"),
        ({"kafka": {"max.poll.interval.ms": "5000"}, "drain_timeout": 20}, "max.poll.interval.ms"),
    ],
)
def test_an_invalid_setting_fails_with_a_message_naming_it(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
        load_settings(**overrides)


def test_forced_consumer_properties_cannot_be_overridden() -> None:
    settings = load_settings(kafka={"session.timeout.ms": "6000"})
    config = consumer_config(settings)
    for name, value in FORCED.items():
        assert config[name] == value
    assert config["session.timeout.ms"] == "6000"
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    # A join lost in a broker restart hangs at most this long; the bridge never blocks its poll.
    assert config["max.poll.interval.ms"] == 60000
    assert config["fetch.wait.max.ms"] == 100
    assert consumer_config(load_settings(kafka={"fetch.wait.max.ms": "500"}))["fetch.wait.max.ms"] == "500"
    assert is_cooperative(config)


def test_the_kip848_protocol_drops_the_classic_assignor() -> None:
    config = consumer_config(load_settings(group_protocol="consumer"))
    assert config["group.protocol"] == "consumer"
    assert "partition.assignment.strategy" not in config
    assert is_cooperative(config)
