"""``python -m devstack``: fetch Kafka, and start or stop local Kafka and Redis (single servers or clusters)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.kafka import KafkaServer, build_class_archive
from devstack.kafka_artifacts import fetch_kafka
from devstack.kafka_cluster import KafkaCluster
from devstack.kafka_config import DEFAULT_KAFKA_VERSION, TESTED_KAFKA_VERSIONS, kafka_release
from devstack.lifetime import outliving
from devstack.paths import default_data_dir
from devstack.process import Service, ServiceError, stop_foreign_pids
from devstack.redis import RedisServer
from devstack.redis_cluster import RedisCluster


@dataclass
class _Stack:
    """One thing ``up`` starts: a single server or a cluster, and the processes it is made of."""

    name: str
    variable: str  # the BRIDGE_ setting that points the bridge at it
    members: Callable[[], Sequence[Service]]
    start: Callable[[float], float]
    address: Callable[[], str]

    def pids(self) -> list[int | None]:
        return [member.detached_pid() for member in self.members()]


def _kafka(data: Path, version: str | None) -> _Stack:
    server = KafkaServer(data / "kafka", version=version)
    return _Stack("kafka", "BRIDGE_BOOTSTRAP_SERVERS", lambda: [server], server.start, lambda: server.bootstrap_servers)


def _kafka_cluster(data: Path, version: str | None) -> _Stack:
    cluster = KafkaCluster(data / "kafka-cluster", version=version)
    return _Stack(
        "kafka-cluster", "BRIDGE_BOOTSTRAP_SERVERS", lambda: list(cluster.nodes.values()), cluster.start,
        lambda: cluster.bootstrap_servers,
    )


def _redis(data: Path, variable: str = "BRIDGE_REDIS_URL") -> _Stack:
    server = RedisServer(data / "redis")
    return _Stack("redis", variable, lambda: [server], server.start, lambda: server.url)


def _redis_cluster(data: Path) -> _Stack:
    cluster = RedisCluster(data / "redis-cluster")
    return _Stack("redis-cluster", "BRIDGE_REDIS_URL", lambda: cluster.nodes, cluster.start,
                  lambda: cluster.ledger_url)


def _all_stacks(data: Path) -> list[_Stack]:
    return [_kafka(data, None), _kafka_cluster(data, None), _redis(data), _redis_cluster(data)]


def _cmd_fetch_kafka(args: argparse.Namespace) -> int:
    for version in args.version or [DEFAULT_KAFKA_VERSION]:
        began = time.monotonic()
        libs = fetch_kafka(version, force=args.force)
        print(f"Kafka {version} runtime in {libs} ({time.monotonic() - began:.1f}s)")
        began = time.monotonic()
        archive = build_class_archive(version)
        if archive is None:
            print("no class-data-sharing archive: brokers start without it (slower)")
        else:
            print(f"class-data-sharing archive {archive} ({time.monotonic() - began:.1f}s)")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    make_kafka = _kafka_cluster if args.kafka_cluster else _kafka
    kafka = make_kafka(args.data, args.kafka_version)
    # dramatiq's Redis broker has no cluster mode: with the ledger on the cluster, the example
    # fleet's task broker (DRAMATIQ_REDIS_URL) is a single redis-server.
    redis = [_redis(args.data, "DRAMATIQ_REDIS_URL"), _redis_cluster(args.data)] if args.redis_cluster else [
        _redis(args.data)
    ]
    exports: list[str] = []
    for stack in (kafka, *redis):
        pids = stack.pids()
        if pids and all(pid is not None for pid in pids):
            print(f"{stack.name}: already running (pids {_join(pids)})")
        elif any(pid is not None for pid in pids):
            raise ServiceError(f"{stack.name} is partly running (pids {_join(pids)}): run `down` first")
        else:
            # The processes outlive this command; `down` finds them again through their pidfiles.
            with outliving():
                seconds = stack.start(args.timeout)
            print(f"{stack.name}: started in {seconds:.1f}s (pids {_join(stack.pids())}, logs in {args.data})")
        print(f"{stack.name}: {stack.address()}")
        exports.append(f"{stack.variable}={stack.address()}")
    print(f"export {' '.join(exports)}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    for stack in _all_stacks(args.data):
        members = stack.members()
        pids = [pid for pid in stack.pids() if pid is not None]
        if not pids:
            if members:  # a cluster that was never started has none
                print(f"{stack.name}: not running")
            continue
        stop_foreign_pids(pids, timeout=args.timeout)
        for member in members:
            member.pidfile.unlink(missing_ok=True)
        print(f"{stack.name}: stopped (pids {_join(pids)})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    for stack in _all_stacks(args.data):
        pids = stack.pids()
        if not pids:
            continue  # never started in this data dir
        running = [pid for pid in pids if pid is not None]
        if not running:
            state = "not running"
        elif len(running) == len(pids):
            state = f"running (pids {_join(pids)})"
        else:
            state = f"partly running ({len(running)} of {len(pids)}: pids {_join(pids)})"
        print(f"{stack.name}: {state} {_address(stack)}")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from devstack.reference import main as config_reference  # imports the bridge package

    return config_reference(args.write)


def _address(stack: _Stack) -> str:
    try:
        return stack.address()
    except ServiceError:
        return ""


def _join(pids: Sequence[int | None]) -> str:
    return ",".join("-" if pid is None else str(pid) for pid in pids)


def _version(text: str) -> str:
    try:
        return kafka_release(text).version
    except ServiceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tested = ", ".join(TESTED_KAFKA_VERSIONS)

    fetch = sub.add_parser(
        "fetch-kafka", help=f"resolve Kafka jars with Maven into the cache (default {DEFAULT_KAFKA_VERSION})"
    )
    fetch.add_argument("--version", action="append", type=_version, metavar="V",
                       help=f"Kafka version to resolve; repeatable (tested: {tested})")
    fetch.add_argument("--force", action="store_true", help="resolve again even if the cache is complete")
    fetch.set_defaults(func=_cmd_fetch_kafka)

    data_help = f"data directory (default: {default_data_dir()})"
    up = sub.add_parser("up", help="start Kafka and Redis in the background and print the exports for the bridge")
    up.add_argument("--data", type=Path, default=default_data_dir(), help=data_help)
    up.add_argument("--timeout", type=float, default=180, help="seconds to wait for each service")
    up.add_argument("--kafka-version", type=_version, metavar="V",
                    help=f"Kafka version (default {DEFAULT_KAFKA_VERSION}; tested: {tested})")
    up.add_argument("--kafka-cluster", action="store_true",
                    help="a 3-broker KRaft cluster (replication factor 3) instead of a single broker")
    up.add_argument("--redis-cluster", action="store_true",
                    help="the ledger on a Redis Cluster (3 primaries, 3 replicas); a single redis-server stays the "
                         "example fleet's task broker")
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop everything `up` started in the same data directory")
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
