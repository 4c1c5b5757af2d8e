from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import fakeredis
import pytest
from dramatiq.brokers.stub import StubBroker

from bridge.ledger import Ledger
from bridge.registry import clear_registry


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def ledger(fake_redis: fakeredis.FakeRedis) -> Ledger:
    return Ledger(fake_redis)


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    clear_registry()
    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()
    clear_registry()
