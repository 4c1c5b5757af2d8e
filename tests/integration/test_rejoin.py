"""The bridge's replaceable consumer against a real broker: replacing it closes the old client,
and the new one joins the group afresh and reads on from the committed offset. (The loop's use of
it, when and when not to replace, is in tests/unit/test_loop.py.)"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from bridge.consumer import consumer_config
from bridge.rejoin import ReplaceableConsumer
from bridge.settings import load_settings
from tests.support.kafka import create_topic, produce_keyed, unique_name

pytestmark = pytest.mark.integration


def test_a_replaced_consumer_closes_the_old_client_and_the_new_one_joins_and_reads_on(kafka: Any) -> None:
    topic = create_topic(AdminClient({"bootstrap.servers": kafka.bootstrap_servers}), unique_name("rejoin"), 1)
    produce_keyed(kafka.bootstrap_servers, topic, 5)
    settings = load_settings(bootstrap_servers=kafka.bootstrap_servers, group_id=unique_name("rejoin"))
    consumer = ReplaceableConsumer(Consumer, consumer_config(settings))
    assigned: list[list[int]] = []

    def on_assign(client: Any, partitions: list[TopicPartition]) -> None:
        assigned.append([p.partition for p in partitions])
        committed = client.committed(partitions, timeout=10)
        client.incremental_assign([TopicPartition(p.topic, p.partition, p.offset if p.offset >= 0 else OFFSET_BEGINNING)
                                   for p in committed])

    def read(count: int) -> list[int]:
        got: list[int] = []
        deadline = time.monotonic() + 30
        while len(got) < count:
            assert time.monotonic() < deadline, f"read {got}, assignments {assigned}"
            got += [m.offset() for m in consumer.consume(num_messages=10, timeout=0.2) if m.error() is None]
        return got

    def subscribe() -> None:
        consumer.subscribe([topic], on_assign=on_assign, on_revoke=lambda c, p: None, on_lost=lambda c, p: None)

    try:
        subscribe()
        assert read(5) == [0, 1, 2, 3, 4]
        consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        old = consumer.client
        consumer.replace()
        with pytest.raises(RuntimeError):  # closed: it left the group
            old.consume(num_messages=1, timeout=0)
        subscribe()
        assert read(2) == [3, 4], "the new consumer reads on from the committed offset"
        assert assigned == [[0], [0]]
    finally:
        consumer.close()
