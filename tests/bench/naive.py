"""The loop people write by hand: poll Kafka, ``actor.send()`` per record, commit after each poll batch.

``python -m tests.bench.naive --bootstrap-servers HOST:PORT --group G --topic T`` (the broker comes from
``BRIDGE_REDIS_URL`` through :mod:`tests.bench.actors`). It commits before the tasks ran, which is
the at-most-once mistake the bridge exists to avoid; here it is only the speed reference.
Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from confluent_kafka import Consumer, KafkaException

from tests.bench.actors import plain_noop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([args.topic])
    try:
        while not stop.is_set():
            messages = consumer.consume(num_messages=args.batch, timeout=0.1)
            for message in messages:
                error = message.error()
                if error is not None:
                    raise KafkaException(error)
                key, value = message.key(), message.value()
                plain_noop.send(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    None if key is None else key.decode(),
                    None if value is None else value.decode(),
                )
            if messages:
                consumer.commit(asynchronous=True)
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
