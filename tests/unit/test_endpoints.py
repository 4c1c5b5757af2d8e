"""The HTTP server's limits: deadlines, the connection cap, one thread whatever the clients do."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from bridge.endpoints import MAX_REQUEST_BYTES, Endpoints
from bridge.health import Thresholds
from bridge.metrics import Metrics
from bridge.stats import Stats
from tests.support.waiting import wait_until

LIMITS = Thresholds(stall_timeout=60, max_record_age=0, outage_timeout=10)


@contextlib.contextmanager
def serving(**limits: Any) -> Iterator[Endpoints]:
    endpoints = Endpoints(Metrics(Stats()), LIMITS, "127.0.0.1", 0, **limits)
    endpoints.start()
    try:
        yield endpoints
    finally:
        endpoints.close()


def dropped(endpoints: Endpoints, reason: str) -> float | None:
    return endpoints.metrics.registry.get_sample_value(
        "kafka_dramatiq_bridge_http_connections_dropped_total", {"reason": reason}
    )


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def get(port: int, path: str) -> bytes:
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bridge\r\n\r\n".encode())
        return read_all(sock)


def closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed ``sock`` (None if it did not within ``within``)."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_a_connection_whose_request_does_not_arrive_in_time_is_closed_without_an_answer() -> None:
    with serving(request_timeout=0.3) as endpoints, connect(endpoints.port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: bridge\r\n")  # no empty line: headers never end
        # Margins for a loaded machine: without the deadline the connection would stay open.
        after = closed_by_server(sock, 6)
        assert after is not None and 0.2 <= after < 4
        assert dropped(endpoints, "timeout") == 1


def test_a_client_sending_a_byte_at_a_time_is_cut_off_at_the_deadline_however_long_it_goes_on() -> None:
    with serving(request_timeout=0.5) as endpoints, connect(endpoints.port) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                sock.send(bytes([byte]))
                time.sleep(0.05)
        # Sending every byte takes 6.5 s; the cut comes at the 0.5 s deadline (margin for load).
        assert time.monotonic() - started < 4, "the server kept reading past its deadline"
        assert dropped(endpoints, "timeout") == 1


def test_a_request_that_arrives_in_pieces_within_the_deadline_is_answered() -> None:
    with serving(request_timeout=2) as endpoints, connect(endpoints.port) as sock:
        for piece in (b"GE", b"T /livez HTTP/1.1\r", b"\nHost: bridge\r\n", b"\r", b"\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        assert read_all(sock).startswith(b"HTTP/1.0 200 OK\r\n")


def test_beyond_the_cap_the_oldest_connection_is_closed_and_the_new_one_answered() -> None:
    with serving(max_connections=4) as endpoints:
        idle = [connect(endpoints.port) for _ in range(4)]
        time.sleep(0.2)  # accepted, in this order
        answer = get(endpoints.port, "/livez")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n")
        assert closed_by_server(idle[0], 1) is not None, "the oldest was not closed"
        assert [closed_by_server(sock, 0.1) for sock in idle[1:]] == [None] * 3, "a newer one was closed"
        assert dropped(endpoints, "cap") == 1
        for sock in idle:
            sock.close()


def test_probes_are_answered_with_hundreds_of_idle_connections_open_and_no_thread_is_added() -> None:
    with serving(max_connections=8) as endpoints:
        threads = threading.active_count()
        started = time.monotonic()
        idle = [connect(endpoints.port) for _ in range(500)]
        # A short listen backlog drops SYNs during such a burst: the connects would stall 1s each.
        assert time.monotonic() - started < 5
        try:
            for path in ("/livez", "/readyz", "/metrics"):
                assert get(endpoints.port, path).split(b"\r\n", 1)[0] in (b"HTTP/1.0 200 OK",
                                                                         b"HTTP/1.0 503 Service Unavailable")
            assert threading.active_count() == threads
            assert endpoints.open_connections <= 8
        finally:
            for sock in idle:
                sock.close()


def test_closing_connections_at_the_cap_logs_one_warning_however_many_it_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.http")
    with serving(max_connections=4) as endpoints:
        idle = [connect(endpoints.port) for _ in range(100)]
        assert get(endpoints.port, "/livez").startswith(b"HTTP/1.0 200 OK")
        assert dropped(endpoints, "cap") == 100 + 1 - 4
        for sock in idle:
            sock.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4 connections open, the cap: closing the oldest" in warnings[0]


def test_request_headers_over_the_limit_are_answered_431_and_closed() -> None:
    with serving() as endpoints, connect(endpoints.port) as sock:
        with contextlib.suppress(ConnectionResetError):
            sock.sendall(b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_BYTES)
        assert read_all(sock).startswith(b"HTTP/1.0 431 ")


def test_other_methods_and_malformed_requests_get_the_standard_librarys_errors() -> None:
    with serving() as endpoints:
        too_many_headers = b"GET /livez HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
        for request, status in ((b"POST /livez HTTP/1.1\r\n\r\n", b"501"), (too_many_headers, b"431")):
            with connect(endpoints.port) as sock:
                sock.sendall(request)
                assert read_all(sock).split(b" ", 2)[1] == status, request


class Large(Collector):
    """A metric larger than the most the kernel buffers for one connection, so its answer waits on the client."""

    def __init__(self) -> None:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            self.size = 2 * int(f.read().split()[2]) + 1_000_000

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("large", "x" * self.size, value=1)


def test_a_client_that_does_not_read_a_large_answer_blocks_nobody_and_is_dropped_after_the_response_timeout() -> None:
    with serving(response_timeout=2) as endpoints:
        endpoints.metrics.registry.register(Large())
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", endpoints.port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            time.sleep(0.2)
            started = time.monotonic()
            assert get(endpoints.port, "/livez").startswith(b"HTTP/1.0 200 OK")
            assert time.monotonic() - started < 1, "the probe waited for the slow reader"
            assert endpoints.open_connections == 1 and dropped(endpoints, "timeout") == 0, "the answer went through"
            wait_until(lambda: dropped(endpoints, "timeout") == 1, 5, message="the slow reader stayed")
            assert time.monotonic() - started >= 1.5
            assert endpoints.open_connections == 0


def test_close_stops_the_thread_closes_the_connections_and_frees_the_port() -> None:
    with serving() as endpoints:
        port = endpoints.port
        idle = connect(port)
        time.sleep(0.1)
    assert not endpoints.serving
    assert closed_by_server(idle, 1) is not None
    idle.close()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
