"""The bridge's HTTP server: ``/metrics``, ``/livez`` and ``/readyz``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import ConfigurationError
from .health import Thresholds, liveness, readiness
from .metrics import Metrics, View

logger = logging.getLogger("bridge.http")


class Endpoints:
    """Serves the metrics and health checks on a daemon thread until :meth:`close`."""

    def __init__(self, metrics: Metrics, limits: Thresholds, host: str, port: int) -> None:
        checks: dict[str, Callable[[View, float, Thresholds], str | None]] = {
            "/livez": liveness,
            "/readyz": readiness,
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path in checks:
                    problem = checks[path](metrics.view, time.monotonic(), limits)
                    self._answer(503 if problem else 200, f"{problem or 'ok'}\n".encode(), "text/plain; charset=utf-8")
                else:
                    self._answer(404, b"not found: try /metrics, /livez or /readyz\n", "text/plain; charset=utf-8")

            def _answer(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("%s " + format, self.address_string(), *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise ConfigurationError(
                f"BRIDGE_HTTP_HOST/BRIDGE_HTTP_PORT: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from None
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kdb-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logger.info("metrics and health checks on http://%s:%d (/metrics, /livez, /readyz)",
                    self._server.server_address[0], self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
