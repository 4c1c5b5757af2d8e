"""The bridge's HTTP server: ``/metrics``, ``/livez`` and ``/readyz``.

One thread serves every connection from a selector, so what the server costs does not depend on
what its clients do: at most :data:`MAX_CONNECTIONS` sockets, each with a bounded buffer and a
deadline. A connection that would go beyond the cap closes the oldest one instead of being turned
away, so an orchestrator's probe gets in however many idle or slow clients hold connections. Each
connection carries one request (HTTP/1.0: no keep-alive).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from .errors import ConfigurationError
from .health import Thresholds, liveness, readiness
from .metrics import PREFIX, Metrics, View

logger = logging.getLogger("bridge.http")

#: Connections open at once. A new one beyond the cap closes the oldest.
MAX_CONNECTIONS = 64
#: Seconds from accepting a connection until its request line and headers must have arrived.
REQUEST_TIMEOUT = 5.0
#: Seconds a client has to take the whole answer.
RESPONSE_TIMEOUT = 15.0
#: Largest request line plus headers; a longer one is answered 431 and closed.
MAX_REQUEST_BYTES = 8192
#: Connections the kernel queues until the server accepts them; beyond it, connects stall.
BACKLOG = 1024
#: Seconds between two warnings about closing connections at the cap.
WARNING_INTERVAL = 60.0
#: Seconds without accepting after the process ran out of file descriptors.
_ACCEPT_BACKOFF = 0.1


def _canned(status: str, text: str) -> bytes:
    body = f"{text}\n".encode()
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


_TOO_LARGE = _canned("431 Request Header Fields Too Large", f"request line and headers over {MAX_REQUEST_BYTES} bytes")
_FAILED = _canned("500 Internal Server Error", "answering failed; the bridge logged why")

Route = Callable[[str], tuple[int, bytes, str]]


class _Exchange(BaseHTTPRequestHandler):
    """One request, parsed by the standard library from memory; the answer goes to memory too."""

    def __init__(self, request: bytes, client_address: Any, route: Route) -> None:
        # Not the socket-bound constructor: the server read the request already and sends the answer.
        self.rfile = io.BytesIO(request)
        self.wfile = io.BytesIO()
        self.client_address = client_address
        self._route = route
        self.handle_one_request()

    def do_GET(self) -> None:
        code, body, content_type = self._route(self.path.split("?", 1)[0])
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    @property
    def answer(self) -> bytes:
        assert isinstance(self.wfile, io.BytesIO)
        return self.wfile.getvalue()


class _Connection:
    __slots__ = ("address", "answer", "deadline", "request", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.request = bytearray()
        self.answer: memoryview | None = None


def _request_end(data: bytearray, start: int) -> int | None:
    """Index just past the empty line that ends the headers, or None; ``start``: where to look from."""
    start = max(start - 3, 0)
    ends = [(i + n) for i, n in ((data.find(b"\n\r\n", start), 3), (data.find(b"\n\n", start), 2)) if i >= 0]
    return min(ends) if ends else None


class Endpoints:
    """Serves the metrics and health checks on a daemon thread until :meth:`close`.

    The caller's thread constructs, starts and closes it. The server thread runs the checks and
    renders ``/metrics`` from the view the main loop publishes; it never blocks on a client.

    Raises:
      ConfigurationError: the address cannot be listened on (a port in use, an unknown host).
    """

    def __init__(
        self,
        metrics: Metrics,
        limits: Thresholds,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        response_timeout: float = RESPONSE_TIMEOUT,
    ) -> None:
        self._metrics = metrics
        self._limits = limits
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._response_timeout = response_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(BACKLOG)
        except OSError as e:
            self._listener.close()
            raise ConfigurationError(
                f"BRIDGE_HTTP_HOST/BRIDGE_HTTP_PORT: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from None
        self._listener.setblocking(False)
        self._address: tuple[str, int] = self._listener.getsockname()
        self.port: int = self._address[1]
        self._dropped = Counter(
            PREFIX + "http_connections_dropped",
            "HTTP connections the bridge closed without an answer: the cap was reached (cap), or the "
            "request or the answer took too long (timeout).",
            ["reason"], registry=metrics.registry,
        )
        for reason in ("cap", "timeout"):
            self._dropped.labels(reason)
        self._checks: dict[str, Callable[[View, float, Thresholds], str | None]] = {
            "/livez": liveness,
            "/readyz": readiness,
        }
        self._open: dict[_Connection, None] = {}  # oldest first
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = False
        self._accept_paused_until = 0.0
        self._last_warning: float | None = None
        self._closed_at_cap = 0
        self._last_accept_error = -WARNING_INTERVAL
        self._thread = threading.Thread(target=self._serve, name="kdb-http", daemon=True)

    @property
    def metrics(self) -> Metrics:
        """What ``/metrics`` serves (and the health checks judge)."""
        return self._metrics

    @property
    def open_connections(self) -> int:
        """Client connections open now (at most the cap)."""
        return len(self._open)

    @property
    def serving(self) -> bool:
        """The server's thread runs (from :meth:`start` until :meth:`close`)."""
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()
        logger.info("metrics and health checks on http://%s:%d (/metrics, /livez, /readyz)", *self._address)

    def close(self) -> None:
        """Stop serving, close every connection and the listening socket."""
        self._stopping = True
        self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(10)
        for conn in list(self._open):
            self._close(conn)
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # -- the server thread ------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST
        if path in self._checks:
            problem = self._checks[path](self._metrics.view, time.monotonic(), self._limits)
            return 503 if problem else 200, f"{problem or 'ok'}\n".encode(), "text/plain; charset=utf-8"
        return 404, b"not found: try /metrics, /livez or /readyz\n", "text/plain; charset=utf-8"

    def _serve(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        while not self._stopping:
            try:
                self._pass()
            except Exception:  # never let one bad pass end the health checks
                logger.exception("HTTP server error")
                time.sleep(_ACCEPT_BACKOFF)

    def _pass(self) -> None:
        now = time.monotonic()
        timeout = min([c.deadline for c in self._open] + [now + 1.0]) - now
        if self._accept_paused_until > now:
            timeout = min(timeout, self._accept_paused_until - now)
        events = self._selector.select(max(timeout, 0.0))
        now = time.monotonic()
        accept = False
        # Reads and writes before accepts, so that a fresh connection is read before it can be the oldest.
        for key, mask in events:
            if key.fileobj is self._listener:
                accept = True
            elif key.fileobj is self._wake_r:
                self._wake_r.recv(64)
            else:
                conn: _Connection = key.data
                if conn not in self._open:
                    continue  # closed earlier in this pass
                if mask & selectors.EVENT_READ:
                    self._read(conn, now)
                elif mask & selectors.EVENT_WRITE:
                    self._write(conn)
        if accept and now >= self._accept_paused_until:
            self._accept(now)
        for conn in [c for c in self._open if c.deadline <= now]:
            self._dropped.labels("timeout").inc()
            logger.debug("%s: %s not through in time; closing", conn.address[0],
                         "request" if conn.answer is None else "answer")
            self._close(conn)

    def _accept(self, now: float) -> None:
        # At most half the cap per pass: a connection accepted in one pass is still open when the next reads.
        for _ in range(max(self._max_connections // 2, 1)):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # Out of file descriptors (EMFILE, ENFILE) or memory: the listener stays readable, so wait.
                if now >= self._last_accept_error + WARNING_INTERVAL:
                    logger.warning("HTTP: cannot accept connections: %s", e.strerror or e)
                    self._last_accept_error = now
                self._accept_paused_until = now + _ACCEPT_BACKOFF
                return
            if len(self._open) >= self._max_connections:
                self._close(next(iter(self._open)))
                self._dropped.labels("cap").inc()
                self._warn_at_cap(now)
            sock.setblocking(False)
            conn = _Connection(sock, address, now + self._request_timeout)
            self._open[conn] = None
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _warn_at_cap(self, now: float) -> None:
        self._closed_at_cap += 1
        if self._last_warning is not None and now < self._last_warning + WARNING_INTERVAL:
            return
        since = (
            "" if self._last_warning is None
            else f"; {self._closed_at_cap} closed this way in the last {now - self._last_warning:.0f}s"
        )
        logger.warning(
            "HTTP: %d connections open, the cap: closing the oldest to accept each new one%s. Something holds "
            "connections open or sends slowly: a port scan, a scraper without a timeout?",
            self._max_connections, since,
        )
        self._closed_at_cap = 0
        self._last_warning = now

    def _read(self, conn: _Connection, now: float) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:  # the client went away before its request was complete
            self._close(conn)
            return
        seen = len(conn.request)
        conn.request += data
        end = _request_end(conn.request, seen)
        if end is None and len(conn.request) <= MAX_REQUEST_BYTES:
            return
        if end is None or end > MAX_REQUEST_BYTES:
            answer = _TOO_LARGE
        else:
            try:
                answer = _Exchange(bytes(conn.request[:end]), conn.address, self._route).answer
            except Exception:
                logger.exception("HTTP: answering %r failed", bytes(conn.request[: conn.request.find(b"\n")]))
                answer = _FAILED
        conn.request = bytearray()
        conn.answer = memoryview(answer)
        conn.deadline = now + self._response_timeout
        self._write(conn)
        if conn in self._open:  # the rest when the client reads on
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.answer is not None
        try:
            sent = conn.sock.send(conn.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.answer = conn.answer[sent:]
        if not conn.answer:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self._open.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
