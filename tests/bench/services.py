"""Kafka and redis-server for one benchmark invocation, and the processes each run starts.

Everything is started here through devstack in a fresh temporary directory and stopped on exit,
including on Ctrl-C and on errors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]  # not in its __all__
from confluent_kafka.cimpl import NewTopic

from devstack import DramatiqWorkers, KafkaServer, RabbitServer, RedisServer, ServiceError
from devstack.process import tail
from tests.support.bridge_proc import REPO, BridgeProcess

ACTORS = "tests.bench.actors"
#: Logs of the bridge, workers and naive loop of every run of the latest invocation.
LOGS = REPO / ".cache" / "bench" / "logs"
PARTITIONS = 6
#: ~100-byte values.
VALUE_PAD = b"v" * 90


def _round_robin(i: int, partitions: int) -> int:
    return i % partitions


class RunFailed(RuntimeError):
    """One measurement run went wrong (a process died, or it did not finish in time)."""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Services:
    """Kafka (single-node KRaft) and redis-server in a temporary directory, on free loopback ports."""

    def __init__(self, log: Callable[[str], None], warm_s: float = 0.0, warm_rate: float = 500.0) -> None:
        self._log = log
        self._warm_s, self._warm_rate = warm_s, warm_rate
        self._stack = ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="kdb-bench-"))
        self.kafka = KafkaServer(self.tmp / "kafka")
        self.redis_server = RedisServer(self.tmp / "redis")
        #: A second redis-server for scenarios that keep the ledger apart from the task broker;
        #: started on first use.
        self.ledger_server = RedisServer(self.tmp / "redis-ledger")
        self._ledger: redis.Redis | None = None
        self.rabbitmq_server = RabbitServer(self.tmp / "rabbitmq")
        self._admin: AdminClient | None = None
        self._redis: redis.Redis | None = None
        self._run = 0

    def __enter__(self) -> Self:
        self._stack.callback(shutil.rmtree, self.tmp, True)
        try:
            self._log(f"starting redis-server in {self.tmp / 'redis'}")
            self.redis_server.start()
            self._stack.callback(self.redis_server.stop)
            self._log(f"starting Kafka in {self.tmp / 'kafka'}")
            seconds = self.kafka.start()
            self._stack.callback(self.kafka.stop)
            self._log(f"Kafka {self.kafka.bootstrap_servers} ready in {seconds:.1f}s, redis {self.redis_url}")
            self._warm_up()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for client in (self._redis, self._ledger):
            if client is not None:
                client.close()
        # Dropping the admin client closes it; alive, it would log every reconnect while Kafka stops.
        self._admin = None
        self._stack.close()

    @property
    def rabbitmq_url(self) -> str:
        """RabbitMQ for the scenarios that put lanes on it, started on first use."""
        if not self.rabbitmq_server.running:
            self._log(f"starting rabbitmq-server in {self.rabbitmq_server.data_dir}")
            seconds = self.rabbitmq_server.start()
            self._stack.callback(self.rabbitmq_server.stop)
            self._log(f"RabbitMQ {self.rabbitmq_server.url} ready in {seconds:.1f}s")
        return self.rabbitmq_server.url

    def _warm_up(self) -> None:
        """Create Kafka's internal state (offsets topic, producer ids) before anything is timed.

        The first group commit and the first idempotent producer of a fresh cluster wait for it,
        which would otherwise land on whichever run comes first.
        """
        began = time.monotonic()
        topic = self.new_topic("warm-up")
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})
        producer.produce(topic, b"warm-up", partition=0)
        if producer.flush(60):
            raise ServiceError("Kafka did not acknowledge the warm-up record")
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("warm-up"),
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + 60
            while True:
                message = consumer.poll(0.5)
                if message is not None and message.error() is None:
                    consumer.commit(message=message, asynchronous=False)
                    break
                if time.monotonic() > deadline:
                    raise ServiceError("the warm-up consumer got nothing from Kafka in 60 s")
        finally:
            consumer.close()
        self.cleanup([topic])
        self._log(f"Kafka warmed up (offsets topic, producer ids) in {time.monotonic() - began:.1f}s")
        if self._warm_s > 0:
            self._warm_paths()

    def _warm_paths(self) -> None:
        """Paced traffic through a fresh broker's produce and fetch paths until its JIT has compiled
        them. A cold broker spent 0.8-1 core on compiling during the first minute at 500 records/s,
        on the same two cores as the pipeline: the first latency run measured that (p50 1,068 ms,
        the next runs 7-20 ms). A broker in service is warm."""
        seconds, rate = self._warm_s, self._warm_rate
        self._log(f"warming Kafka's produce and fetch paths: {rate:g} records/s for {seconds:g} s")
        topic = self.new_topic("warm-paths")
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 0})
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("warm-paths"),
                             "auto.offset.reset": "earliest", "enable.auto.commit": False,
                             "fetch.wait.max.ms": 100})
        received = 0
        try:
            consumer.subscribe([topic])
            began = time.monotonic()
            next_progress = began + 10
            count = int(seconds * rate)
            for i in range(count):
                if (delay := began + i / rate - time.monotonic()) > 0:
                    received += len(consumer.consume(num_messages=1000, timeout=delay))
                if time.monotonic() >= next_progress:
                    self._log(f"warming Kafka: {i:,}/{count:,} produced, {received:,} fetched")
                    next_progress += 10
                producer.produce(topic, b"%010d" % i + VALUE_PAD, partition=i % PARTITIONS)
                producer.poll(0)
            if producer.flush(30):
                raise ServiceError("Kafka did not acknowledge the warm-up traffic in 30 s")
            deadline = time.monotonic() + 30
            while received < count and time.monotonic() < deadline:
                received += len(consumer.consume(num_messages=1000, timeout=0.1))
        finally:
            consumer.close()
        self.cleanup([topic])
        self._log(f"Kafka warm: {count:,} records produced and {received:,} fetched in "
                  f"{time.monotonic() - began:.1f}s")

    # -- clients ----------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap_servers

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    @property
    def ledger_url(self) -> str:
        """A redis-server of its own for the ledger, started on first use."""
        if not self.ledger_server.running:
            self._log(f"starting a second redis-server for the ledger in {self.ledger_server.data_dir}")
            self.ledger_server.start()
            self._stack.callback(self.ledger_server.stop)
        return self.ledger_server.url

    @property
    def ledger(self) -> redis.Redis:
        """A client of :attr:`ledger_url`."""
        if self._ledger is None:
            self._ledger = redis.Redis.from_url(self.ledger_url, decode_responses=True)
        return self._ledger

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        return self._redis

    def redis_url_as(self, client_name: str) -> str:
        """:attr:`redis_url` with a client name: CLIENT LIST and MONITOR then tell the processes apart."""
        return f"{self.redis_url}?client_name={client_name}"

    def redis_version(self) -> str:
        return str(self.redis.info("server")["redis_version"])

    def run_dir(self, name: str) -> Path:
        """A fresh directory for the logs of one run (kept after exit, replaced by the next invocation)."""
        if self._run == 0:
            shutil.rmtree(LOGS, ignore_errors=True)
        self._run += 1
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        path = LOGS / f"{self._run:02d}-{slug}"
        path.mkdir(parents=True)
        return path

    # -- topics -----------------------------------------------------------------------------

    def new_topic(self, prefix: str, partitions: int = PARTITIONS) -> str:
        name = unique(prefix)
        timeout = 30 + partitions / 20
        futures = self.admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)], operation_timeout=timeout
        )
        futures[name].result(timeout)
        deadline = time.monotonic() + timeout
        while True:
            topic = self.admin.list_topics(name, timeout=5).topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and len(topic.partitions) == partitions
                and all(p.leader >= 0 and p.error is None for p in topic.partitions.values())
            ):
                return name
            if time.monotonic() > deadline:
                raise RunFailed(f"topic {name} never showed {partitions} led partitions")
            time.sleep(0.05)

    def cleanup(self, topics: list[str]) -> None:
        """Forget one run: delete its topics (and dead-letter topics) and empty Redis.

        Called only when no process of the run is alive any more.
        """
        names = [t for topic in topics for t in (topic, f"{topic}.dlq")]
        if names:
            for future in self.admin.delete_topics(names, operation_timeout=30).values():
                with contextlib.suppress(KafkaException):
                    future.result(30)  # a dead-letter topic that was never created
        self.redis.flushall()
        if self._ledger is not None:
            self._ledger.flushall()

    def produce(
        self,
        topic: str,
        count: int,
        *,
        partition: Callable[[int], int] | None = None,
        key: Callable[[int], bytes | None] = lambda i: None,
        progress: Callable[[int], None] | None = None,
        partitions: int = PARTITIONS,
    ) -> None:
        """Produce ``count`` ~100-byte records fast (batched) and wait for every acknowledgement.

        Record i goes to ``partition(i)``, by default i % ``partitions``.
        """
        errors: list[KafkaError] = []
        if partition is None:
            partition = functools.partial(_round_robin, partitions=partitions)

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": 20,
                "batch.num.messages": 10_000,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 500_000,
            }
        )
        for i in range(count):
            while True:
                try:
                    producer.produce(
                        topic, b"%010d" % i + VALUE_PAD, key(i), partition=partition(i), on_delivery=on_delivery
                    )
                    break
                except BufferError:
                    producer.poll(0.01)
            if i % 10_000 == 0:
                producer.poll(0)
                if progress is not None and i:
                    progress(i)
        remaining = producer.flush(120)
        if remaining or errors:
            raise RunFailed(f"producing to {topic}: {remaining} undelivered, errors {errors[:3]}")

    def ends(self, topic: str, partitions: int = PARTITIONS) -> dict[int, int]:
        """High watermark of every partition (one request for all of them)."""
        futures = self.admin.list_offsets(
            {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)},  # type: ignore[no-untyped-call]
            request_timeout=30,
        )
        return {tp.partition: int(future.result(30).offset) for tp, future in futures.items()}

    # -- processes --------------------------------------------------------------------------

    def base_env(self, group: str) -> dict[str, str]:
        return {
            "BRIDGE_BOOTSTRAP_SERVERS": self.bootstrap,
            "BRIDGE_REDIS_URL": self.redis_url,
            "BRIDGE_GROUP_ID": group,
            # Workers look for new lanes every 0.2 s instead of 1 s, like the integration tests.
            "BRIDGE_LANE_REFRESH_INTERVAL": "0.2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }

    @contextlib.contextmanager
    def workers(
        self, env: dict[str, str], run_dir: Path, processes: int = 2, threads: int = 8
    ) -> Iterator[DramatiqWorkers]:
        """The stock ``dramatiq`` CLI over :mod:`tests.bench.actors`, ready when this yields."""
        workers = DramatiqWorkers(
            [ACTORS],
            processes=processes,
            threads=threads,
            env={**os.environ, **env},
            cwd=REPO,
            log_path=run_dir / "workers.log",
        )
        try:
            workers.start()
            yield workers
        finally:
            # SIGKILL: by now every message was handled (or the run failed), and Redis is emptied
            # next; a graceful stop only adds dramatiq's 1-2 s shutdown to every run.
            workers.kill()

    @contextlib.contextmanager
    def bridge(self, env: dict[str, str], run_dir: Path) -> Iterator[BridgeProcess]:
        """``python -m bridge run tests.bench.actors``; killed on exit unless already stopped."""
        bridge = BridgeProcess([ACTORS], env, log_path=run_dir / "bridge.log")
        try:
            bridge.start()
            yield bridge
        finally:
            bridge.kill()

    @contextlib.contextmanager
    def naive(self, env: dict[str, str], topic: str, group: str, run_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
        """The naive loop (:mod:`tests.bench.naive`) as a subprocess, stopped with SIGTERM on exit."""
        with (run_dir / "naive.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.naive", "--bootstrap-servers", self.bootstrap,
                 "--group", group, "--topic", topic],
                cwd=REPO, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Committed:
    """The group's committed offsets, read by a consumer that never joins the group."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int = PARTITIONS) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._timeout = 5 + partitions / 200

    def read(self) -> dict[int, int]:
        try:
            return {tp.partition: tp.offset for tp in self._consumer.committed(self._tps, timeout=self._timeout)}
        except KafkaException:
            return {}  # the coordinator is still loading; ask again next round

    def settled(self, attempts: int = 10) -> dict[int, int]:
        """:meth:`read`, asked again (every 0.5 s) while Kafka does not answer."""
        offsets = self.read()
        for _ in range(attempts - 1):
            if offsets:
                break
            time.sleep(0.5)
            offsets = self.read()
        return offsets

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def alive(what: str, returncode: int | None, log: Path) -> None:
    """Raise :class:`RunFailed` with the log tail if a process has exited (``returncode`` is set)."""
    if returncode is not None:
        raise RunFailed(f"{what} exited with code {returncode}:\n{tail(log, 30)}")


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB (empty once it is gone)."""
    found: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found
