"""The local stack in one command: Kafka, Redis, a worker fleet, the bridge and a producer.

``python -m tasks.demo`` starts everything on loopback (data in ``.cache/demo``), produces
sample orders, payments and audit events at a steady rate, prints progress every few seconds,
and on Ctrl-C stops the producer, lets the bridge drain and commit, then stops the rest.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from devstack import DramatiqWorkers, KafkaServer, RedisServer
from devstack.paths import cache_dir
from tasks.topics import create_topics

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=300, help="records per second to produce (default 300)")
    parser.add_argument("--count", type=int, default=0, help="records to produce, 0 = until Ctrl-C")
    parser.add_argument("--workers", type=int, default=2, help="dramatiq worker processes")
    parser.add_argument("--data", type=Path, default=cache_dir() / "demo", help="where Kafka and Redis keep data")
    args = parser.parse_args()

    kafka, store = KafkaServer(args.data / "kafka"), RedisServer(args.data / "redis", aof=True)
    print(f"starting Kafka ({args.data / 'kafka'}) ...", flush=True)
    seconds = kafka.start()
    print(f"kafka up at {kafka.bootstrap_servers} in {seconds:.1f}s", flush=True)
    seconds = store.start()
    print(f"redis up at {store.url} in {seconds:.1f}s", flush=True)
    env = {
        **os.environ,
        "BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BRIDGE_REDIS_URL": store.url,
        "BRIDGE_GROUP_ID": "demo",
        "BRIDGE_PROGRESS_INTERVAL": "5",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }
    create_topics(kafka.bootstrap_servers)
    logs = args.data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = DramatiqWorkers(
        ["tasks"], processes=args.workers, threads=8, env=env, cwd=REPO, log_path=logs / "workers.log"
    )
    print(f"workers ready in {workers.start():.1f}s (log: {workers.log_path})", flush=True)
    # The bridge's own log goes to the terminal: its progress line is the demo's heartbeat.
    # Own sessions: Ctrl-C reaches only this script, which stops the others in order.
    bridge = subprocess.Popen([sys.executable, "-m", "bridge", "run", "tasks"], cwd=REPO, env=env,
                              start_new_session=True)
    producer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tasks.produce",
            "--count",
            str(args.count),
            "--rate",
            str(args.rate),
            "--bootstrap-servers",
            kafka.bootstrap_servers,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    counts = redis.Redis.from_url(store.url)
    print(
        "running; press Ctrl-C to stop. In another shell: "
        f"BRIDGE_BOOTSTRAP_SERVERS={kafka.bootstrap_servers} BRIDGE_REDIS_URL={store.url} "
        "BRIDGE_GROUP_ID=demo kafka-dramatiq-bridge status tasks",
        flush=True,
    )
    try:
        while bridge.poll() is None:
            time.sleep(5)
            done = {k: int(counts.get(f"tasks:{k}:count") or 0) for k in ("orders", "payments", "audit")}
            print("handled: " + ", ".join(f"{k} {v}" for k, v in done.items()), flush=True)
    except KeyboardInterrupt:
        print("\nstopping: producer, then bridge (drain and commit), then workers ...", flush=True)
    finally:
        # A second Ctrl-C must not abandon the services half stopped: the waits below are bounded.
        signal.signal(signal.SIGINT, lambda *_: print("still stopping ...", flush=True))
        producer.send_signal(signal.SIGINT)
        producer.wait(30)
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
        code = bridge.wait(120)
        workers.stop()
        store.stop()
        kafka.stop()
        print(f"stopped (bridge exit code {code})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
