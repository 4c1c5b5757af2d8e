"""Sample producer for the example fleet: ``python -m tasks.produce --count 1000 --rate 200``."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time

from confluent_kafka import Producer


def sample(i: int, rng: random.Random) -> tuple[str, str, bytes]:
    kind = i % 3
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
    return result


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # `docker stop` sends SIGTERM: stop like on Ctrl-C, flushing what was produced.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    producer = Producer(
        {"bootstrap.servers": args.bootstrap_servers, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
    )
    rng = random.Random(7)
    start = time.monotonic()
    i = 0
    try:
        while args.count == 0 or i < args.count:
            topic, key, value = sample(i, rng)
            producer.produce(topic, value, key=key)
            producer.poll(0)
            i += 1
            if i % 1000 == 0:
                print(f"produced {i} records", flush=True)
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
    print(f"produced {i} records in {time.monotonic() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
