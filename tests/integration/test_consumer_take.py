"""A record after a quiet spell is taken as soon as it arrives, however large the batch asked for."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from bridge.consumer import take
from tests.support.kafka import create_topic, produce_keyed, unique_name

pytestmark = pytest.mark.integration

#: Long enough that a call waiting out its timeout cannot pass for one that did not.
WAIT = 20.0


def test_one_record_after_silence_is_taken_without_waiting_out_the_timeout(kafka: Any) -> None:
    topic = create_topic(AdminClient({"bootstrap.servers": kafka.bootstrap_servers}), unique_name("take"), 1)
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": unique_name("take"),
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        assert take(consumer, 500, 1.0) == []  # quiet: nothing to take
        produce_keyed(kafka.bootstrap_servers, topic, 1)
        began = time.monotonic()
        got = take(consumer, 500, WAIT)
        took = time.monotonic() - began
        assert [m.offset() for m in got] == [0]
        # A batch consume of 500 returns only when its timeout ends (librdkafka waits for the batch
        # to fill); take returns with the record.
        assert took < WAIT / 2, f"took {took:.1f}s"
        produce_keyed(kafka.bootstrap_servers, topic, 3)
        time.sleep(1)  # all three fetched
        assert [m.offset() for m in take(consumer, 500, WAIT)] == [1, 2, 3], "the rest comes in the same call"
    finally:
        consumer.close()
