"""``python -m devstack``: fetch Kafka, and start or stop a local Kafka + Redis pair."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devstack.kafka import KafkaServer, build_class_archive
from devstack.kafka_artifacts import KAFKA_VERSION, fetch_kafka
from devstack.paths import default_data_dir
from devstack.process import Service, ServiceError, stop_foreign_pid
from devstack.redis import RedisServer


def _services(data: Path) -> tuple[KafkaServer, RedisServer]:
    return KafkaServer(data / "kafka"), RedisServer(data / "redis")


def _cmd_fetch_kafka(args: argparse.Namespace) -> int:
    began = time.monotonic()
    libs = fetch_kafka(force=args.force)
    print(f"Kafka {KAFKA_VERSION} runtime in {libs} ({time.monotonic() - began:.1f}s)")
    began = time.monotonic()
    archive = build_class_archive()
    if archive is None:
        print("no class-data-sharing archive: brokers start without it (slower)")
    else:
        print(f"class-data-sharing archive {archive} ({time.monotonic() - began:.1f}s)")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    kafka, redis = _services(args.data)
    service: Service
    for service in (kafka, redis):
        pid = service.detached_pid()
        if pid is not None:
            print(f"{service.name}: already running (pid {pid})")
            continue
        seconds = service.start(timeout=args.timeout)
        # The process outlives this command; `down` finds it again through the pidfile.
        print(f"{service.name}: started in {seconds:.1f}s (pid {service.pid}, logs in {service.data_dir})")
    print(f"kafka: {kafka.bootstrap_servers}")
    print(f"redis: {redis.url}")
    print(f"export BRIDGE_BOOTSTRAP_SERVERS={kafka.bootstrap_servers} BRIDGE_REDIS_URL={redis.url}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    service: Service
    for service in _services(args.data):
        pid = service.detached_pid()
        if pid is None:
            print(f"{service.name}: not running")
            continue
        stop_foreign_pid(pid, timeout=args.timeout)
        service.pidfile.unlink(missing_ok=True)
        print(f"{service.name}: stopped (pid {pid})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    kafka, redis = _services(args.data)
    for service, address in ((kafka, _address(kafka)), (redis, _address(redis))):
        pid = service.detached_pid()
        state = f"running (pid {pid})" if pid is not None else "not running"
        print(f"{service.name}: {state} {address}")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from devstack.reference import main as config_reference  # imports the bridge package

    return config_reference(args.write)


def _address(service: KafkaServer | RedisServer) -> str:
    try:
        return service.bootstrap_servers if isinstance(service, KafkaServer) else service.url
    except ServiceError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-kafka", help=f"resolve Kafka {KAFKA_VERSION} jars with Maven into the cache")
    fetch.add_argument("--force", action="store_true", help="resolve again even if the cache is complete")
    fetch.set_defaults(func=_cmd_fetch_kafka)

    data_help = f"data directory (default: {default_data_dir()})"
    up = sub.add_parser("up", help="start Kafka and Redis in the background")
    up.add_argument("--data", type=Path, default=default_data_dir(), help=data_help)
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait for each service")
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop what `up` started in the same data directory")
    down.add_argument("--data", type=Path, default=default_data_dir(), help=data_help)
    down.add_argument("--timeout", type=float, default=30, help="seconds before SIGKILL")
    down.set_defaults(func=_cmd_down)

    reference = sub.add_parser("config-reference", help="print docs/configuration.md with its settings tables "
                               "generated from the settings model")
    reference.add_argument("--write", action="store_true", help="rewrite docs/configuration.md in place")
    reference.set_defaults(func=_cmd_config_reference)

    status = sub.add_parser("status", help="show whether `up` services are running")
    status.add_argument("--data", type=Path, default=default_data_dir(), help=data_help)
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
