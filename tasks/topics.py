"""Create the example fleet's topics if they are missing: ``python -m tasks.topics``.

Topics that already exist are left as they are, so running it again (the compose stack's
one-shot ``topics`` service runs it at every start) changes nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

#: Topic -> partitions when no ``--partitions`` is given.
TOPICS = {"orders": 6, "payments": 3, "audit-events": 3, "page-views": 3}


def create_topics(
    bootstrap: str, partitions: int | None = None, replication_factor: int = 1, timeout: float = 60.0
) -> list[str]:
    """Create the missing example topics and wait until every partition has a leader.

    Returns the topics this call created. A topic created by someone else meanwhile counts as
    existing.
    """
    # librdkafka's lines go through logging, served by the polls after each request.
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": logging.getLogger("tasks.topics")})
    existing = admin.list_topics(timeout=timeout).topics
    admin.poll(0)
    wanted = [
        NewTopic(topic, num_partitions=partitions or n, replication_factor=replication_factor)
        for topic, n in TOPICS.items()
        if topic not in existing
    ]
    created = []
    for topic, future in (admin.create_topics(wanted, operation_timeout=timeout).items() if wanted else []):
        try:
            future.result(timeout)
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    admin.poll(0)
    _wait_for_leaders(admin, timeout)
    return created


def _wait_for_leaders(admin: AdminClient, timeout: float) -> None:
    # A bridge started right after this returns stops with "topic does not exist" unless the
    # metadata already shows the topics.
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        ready = [
            name in topics
            and topics[name].error is None
            and bool(topics[name].partitions)
            and all(p.leader >= 0 and p.error is None for p in topics[name].partitions.values())
            for name in TOPICS
        ]
        if all(ready):
            return
        if time.monotonic() > deadline:
            missing = [name for name, ok in zip(TOPICS, ready, strict=True) if not ok]
            raise TimeoutError(f"topics without a leader after {timeout:.0f}s: {', '.join(missing)}")
        time.sleep(0.2)


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument(
        "--partitions", type=int, help="partitions of every topic (default: " +
        ", ".join(f"{t} {n}" for t, n in TOPICS.items()) + ")",
    )
    result.add_argument("--replication-factor", type=int, default=1, help="replicas of each partition (default 1)")
    result.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Kafka (default 60)")
    result.add_argument("--bootstrap-servers", default=os.environ.get("BRIDGE_BOOTSTRAP_SERVERS", "localhost:9092"))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        created = create_topics(args.bootstrap_servers, args.partitions, args.replication_factor, args.timeout)
    except (KafkaException, TimeoutError) as exc:
        print(f"cannot create topics at {args.bootstrap_servers}: {exc}", file=sys.stderr, flush=True)
        return 1
    for topic in TOPICS:
        print(f"{topic}: {'created' if topic in created else 'exists'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
