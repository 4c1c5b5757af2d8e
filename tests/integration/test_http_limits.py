"""The HTTP endpoint of a running bridge under idle and slow clients: its cost stays bounded, the
probes and scrapes are answered, and records keep flowing at the rate they did without them."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
from confluent_kafka import Producer

from bridge.endpoints import MAX_CONNECTIONS, REQUEST_TIMEOUT
from devstack import free_port
from tests.integration.test_bridge import wait_committed_to_end
from tests.integration.test_operations import Samples, per_topic, scrape
from tests.support import http
from tests.support.history import check, read_events
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Records per second, paced, in every phase.
RATE = 200
#: Seconds each phase is measured: two request timeouts, so slow clients get dropped and come back.
WINDOW = 2 * REQUEST_TIMEOUT
IDLE_CLIENTS = 3000
SLOW_CLIENTS = 50
#: Connections per second the idle clients open again after the bridge closed some of theirs.
REOPEN_RATE = 200


@dataclass
class Sample:
    threads: int
    rss_mb: float
    fds: int


def process(pid: int) -> Sample:
    status = open(f"/proc/{pid}/status").read()  # noqa: SIM115
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    return Sample(threads, rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")))


class Background(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def loop(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive(), f"{self.name} did not stop"
        if self.error is not None:
            raise self.error


class PacedProducer(Background):
    """Produces ``RATE`` records a second, on schedule, until stopped."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        super().__init__("paced-producer")
        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap_servers, "enable.idempotence": True,
                                  "acks": "all", "linger.ms": 5})
        self.produced = 0

    def loop(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            due = int((time.monotonic() - started) * RATE)
            while self.produced < due:
                self.producer.produce(self.topic, key=str(self.produced % 97), value=str(self.produced))
                self.produced += 1
            self.producer.poll(0)
            time.sleep(0.02)
        assert self.producer.flush(30) == 0, "records left undelivered"


class IdleClients(Background):
    """Opens ``IDLE_CLIENTS`` connections that never send a byte and holds them. Once ``reopen`` is
    set, each one the bridge closed is opened again, at most ``REOPEN_RATE`` a second, so the bridge's
    cap stays full."""

    def __init__(self, port: int) -> None:
        super().__init__("idle-clients")
        self.port = port
        self.socks: dict[int, socket.socket] = {}
        self.poller = select.poll()
        self.opened = 0
        self.failed = 0
        self.ready = threading.Event()
        self.reopen = threading.Event()

    def open(self) -> None:
        sock = socket.socket()
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            self.failed += 1
            return
        self.socks[sock.fileno()] = sock
        self.poller.register(sock, select.POLLIN)
        self.opened += 1

    def loop(self) -> None:
        while len(self.socks) < IDLE_CLIENTS and not self.stopping.is_set():
            self.open()
        self.ready.set()
        while not self.stopping.is_set():
            started = time.monotonic()
            for fd, _ in self.poller.poll(100):
                self.poller.unregister(fd)
                self.socks.pop(fd).close()  # readable means closed: these clients never asked anything
            if self.reopen.is_set():
                for _ in range(min(IDLE_CLIENTS - len(self.socks), REOPEN_RATE // 10)):
                    self.open()
            time.sleep(max(0.1 - (time.monotonic() - started), 0))

    def stop(self) -> None:
        super().stop()
        for sock in self.socks.values():
            sock.close()


class SlowClients(Background):
    """``SLOW_CLIENTS`` connections that send a request one byte a second and never finish it; one
    the bridge drops connects again within a second."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: bridge\r\nX-Slow: " + b"a" * 4096

    def __init__(self, port: int) -> None:
        super().__init__("slow-clients")
        self.port = port
        self.clients: list[tuple[socket.socket, int] | None] = [None] * SLOW_CLIENTS
        self.dropped = 0

    def loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            for i, client in enumerate(self.clients):
                if client is None:
                    with contextlib.suppress(OSError):
                        self.clients[i] = (socket.create_connection(("127.0.0.1", self.port), timeout=5), 0)
                    continue
                sock, sent = client
                try:
                    with contextlib.suppress(BlockingIOError):
                        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                            raise ConnectionResetError("closed by the bridge")
                    sock.send(self.REQUEST[sent:sent + 1])
                    self.clients[i] = (sock, sent + 1)
                except OSError:
                    sock.close()
                    self.clients[i] = None
                    self.dropped += 1
            time.sleep(max(1.0 - (time.monotonic() - started), 0))

    def stop(self) -> None:
        super().stop()
        for client in self.clients:
            if client is not None:
                client[0].close()


@dataclass
class Phase:
    """What one measured window showed."""

    done: float = 0.0
    seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    livez_ms: list[float] = field(default_factory=list)
    livez_codes: list[int | None] = field(default_factory=list)
    scrapes: int = 0

    @property
    def rate(self) -> float:
        return self.done / self.seconds

    def figures(self) -> str:
        return (f"{max(s.threads for s in self.samples)} threads, {max(s.rss_mb for s in self.samples):.0f} MB RSS, "
                f"{max(s.fds for s in self.samples)} fds, /livez median {statistics.median(self.livez_ms):.1f} ms "
                f"max {max(self.livez_ms):.1f} ms, {self.rate:.0f} records/s")


def done_total(port: int, topic: str) -> float:
    samples: Samples = scrape(port)
    return per_topic(samples, "records_done_total").get(topic, 0.0)


def dropped(port: int) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in scrape(port).items()
            if name == "kafka_dramatiq_bridge_http_connections_dropped_total"}


def measure(port: int, pid: int, topic: str, seconds: float) -> Phase:
    """Samples the process, probes ``/livez`` (a new connection each, as a kubelet does) twice a
    second and scrapes ``/metrics`` every two seconds, for ``seconds``."""
    phase = Phase()
    first = done_total(port, topic)
    started = time.monotonic()
    ticks = 0
    while time.monotonic() - started < seconds:
        phase.samples.append(process(pid))
        before = time.perf_counter()
        code, _ = http.get(f"http://127.0.0.1:{port}/livez")
        phase.livez_ms.append((time.perf_counter() - before) * 1000)
        phase.livez_codes.append(code)
        ticks += 1
        if ticks % 4 == 0:
            scrape(port)
            phase.scrapes += 1
        time.sleep(0.5)
    phase.done = done_total(port, topic) - first
    phase.seconds = time.monotonic() - started
    return phase


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for the attack's client sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CLIENTS + SLOW_CLIENTS + 1024
    assert hard == resource.RLIM_INFINITY or hard >= wanted, f"the hard limit on open files is {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_and_slow_clients_leave_threads_memory_probes_and_the_record_rate_as_they_were(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    many_files: None,
) -> None:
    topic = topic_factory(4)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition")
    pipeline.start_workers(processes=1, threads=4)
    port = free_port()
    bridge = pipeline.start_bridge(env={"BRIDGE_HTTP_PORT": str(port)})
    wait_until(lambda: http.get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 60, interval=0.2,
               message=lambda: bridge.log[-2000:])
    assert bridge.proc is not None
    pid = bridge.proc.pid
    producer = PacedProducer(pipeline.kafka.bootstrap_servers, topic)
    producer.start()
    idle, slow = IdleClients(port), SlowClients(port)
    try:
        wait_until(lambda: done_total(port, topic) >= RATE * 3, 60, interval=0.2,
                   message="records never started flowing")  # warmed up: lanes open, workers busy
        quiet = measure(port, pid, topic, WINDOW)
        idle.start()
        slow.start()
        # A short listen backlog would stall many of these connects for a SYN retransmit (1 s) each.
        assert idle.ready.wait(120), "3,000 connects did not get through the listen backlog in 120 s"
        # The 3,000 idle connections held, the slow clients sending: the bridge cuts both off.
        held = measure(port, pid, topic, WINDOW)
        held_dropped = dropped(port)
        # The idle clients open again what the bridge closed: the cap stays full.
        idle.reopen.set()
        full = measure(port, pid, topic, WINDOW)
        full_dropped = dropped(port)
    finally:
        for worker in (idle, slow):
            if worker.ident is not None:
                worker.stop()
        producer.stop()
    print(f"\nquiet: {quiet.figures()}\nheld:  {held.figures()}\nfull:  {full.figures()}\n"
          f"{idle.opened} idle connections opened, {slow.dropped} slow ones dropped; "
          f"dropped by the bridge: {held_dropped} then {full_dropped}")

    base = quiet.samples[-1]
    for name, phase in (("held", held), ("full", full)):
        assert max(s.threads for s in phase.samples) <= base.threads + 2, f"{name}: the clients cost threads"
        assert max(s.rss_mb for s in phase.samples) <= base.rss_mb + 20, f"{name}: the clients cost memory"
        assert max(s.fds for s in phase.samples) <= base.fds + MAX_CONNECTIONS + 2, f"{name}: over the cap"
        assert phase.livez_codes == [200] * len(phase.livez_codes), f"{name}: a probe went unanswered"
        assert statistics.median(phase.livez_ms) <= 100 and max(phase.livez_ms) < 1000, phase.livez_ms
        assert phase.rate >= 0.8 * quiet.rate, f"{name}: {phase.rate:.0f} records/s, {quiet.rate:.0f} without clients"
    # Slow clients were cut off by the request timeout while the cap had room, and by the cap once full.
    assert idle.failed == 0
    assert held_dropped["timeout"] >= SLOW_CLIENTS
    assert held_dropped["cap"] >= IDLE_CLIENTS - MAX_CONNECTIONS
    assert full_dropped["cap"] - held_dropped["cap"] >= REOPEN_RATE * WINDOW / 2
    assert bridge.log.count("connections open, the cap") == 1, "the warning is not rate-limited"

    # Every record processed once and committed.
    ends = wait_committed_to_end(pipeline)
    assert sum(ends.values()) == producer.produced
    report = check(read_events(redis_client), scope="partition")
    assert sum(len(offsets) for offsets in report.processed.values()) == producer.produced
    assert report.duplicates == 0 and report.order_violations == [] and report.overlaps == []
    assert done_total(port, topic) == producer.produced
    assert bridge.stop() == 0
