"""Sample producer for the example fleet: ``python -m tasks.produce --count 1000 --rate 200``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any

from confluent_kafka import Producer

from bridge.logs import configure

logger = logging.getLogger("tasks.produce")


def sample(i: int, rng: random.Random) -> tuple[str, str, bytes]:
    kind = i % 4
    if kind == 0:
        customer = f"customer-{rng.randrange(50)}"
        items = [
            {"sku": f"sku-{rng.randrange(500)}", "qty": rng.randint(1, 4), "price": rng.randint(100, 9999) / 100}
            for _ in range(rng.randint(1, 3))
        ]
        return "orders", customer, json.dumps({"id": i, "items": items}).encode()
    if kind == 1:
        account = f"acct-{rng.randrange(20)}"
        return "payments", account, f"{account}:{rng.randint(1, 50000) / 100}".encode()
    if kind == 3:
        return "page-views", f"visitor-{rng.randrange(100)}", f"/products/{rng.randrange(40)}".encode()
    return (
        "audit-events",
        f"user-{rng.randrange(10)}",
        json.dumps({"actor": f"user-{rng.randrange(10)}", "action": rng.choice(["login", "view", "edit"])}).encode(),
    )


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=__doc__)
    result.add_argument("--count", type=int, default=3000, help="records to produce (0: until interrupted)")
    result.add_argument("--rate", type=float, default=300.0, help="records per second")
    result.add_argument("--bootstrap-servers", default=os.environ.get("BRIDGE_BOOTSTRAP_SERVERS", "localhost:9092"))
    result.add_argument(
        "--flush-timeout", type=float, default=10.0, help="seconds to wait for acknowledgements when stopping"
    )
    return result


def producer_config(bootstrap_servers: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap_servers,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        # librdkafka's own lines (served by poll and flush) in the log format, not raw on stderr.
        "logger": logger,
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure("INFO")
    # Ctrl-C, or SIGTERM from `docker stop`, only asks the loop to stop: a second one (the demo
    # forwards one after the terminal's) cannot interrupt the flush of what was produced.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    producer = Producer(producer_config(args.bootstrap_servers))
    rng = random.Random(7)
    start = time.monotonic()
    i = 0
    while (args.count == 0 or i < args.count) and not stop.is_set():
        topic, key, value = sample(i, rng)
        producer.produce(topic, value, key=key)
        producer.poll(0)
        i += 1
        if i % 1000 == 0:
            print(f"produced {i} records", flush=True)
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            stop.wait(delay)
    unacknowledged = producer.flush(args.flush_timeout)
    if unacknowledged:
        logger.warning("stopped with %d records not acknowledged after %.0fs", unacknowledged, args.flush_timeout)
    print(f"produced {i} records in {time.monotonic() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
