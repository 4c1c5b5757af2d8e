"""redis-server from the system package, configured for one data dir on the loopback interface."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import redis

from devstack.ports import HOST, free_port
from devstack.process import Service, ServiceError


def redis_server_binary() -> str:
    """Path of ``redis-server``; raises :class:`ServiceError` when it is not installed."""
    found = shutil.which("redis-server") or shutil.which("/usr/bin/redis-server")
    if found is None:
        raise ServiceError("redis-server is not installed (Debian: apt-get install redis-server)")
    return found


@dataclass(frozen=True)
class RedisTls:
    """A TLS port beside the plain one (clients need not present certificates)."""

    cert: Path
    key: Path
    ca: Path


class RedisServer(Service):
    """A redis-server process whose config, dumps and logs live in ``data_dir``.

    Without ``aof`` nothing is persisted (``save ""``); with it every write is
    fsynced to the append-only file before it is acknowledged, so a SIGKILL loses
    nothing that a client saw succeed. The port is chosen on first start and kept
    in ``devstack-redis.json`` so a restart serves the same URL.
    """

    name = "redis"

    def __init__(
        self, data_dir: Path, *, port: int | None = None, aof: bool = False, tls: RedisTls | None = None
    ) -> None:
        super().__init__(data_dir)
        self.aof = aof
        self.tls = tls
        self._port = port if port is not None else self._saved_port()
        self._tls_port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError(f"redis in {self.data_dir} has no port yet: start it first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def tls_port(self) -> int:
        if self._tls_port is None:
            raise ServiceError(f"redis in {self.data_dir} has no TLS port: start it with tls=")
        return self._tls_port

    @property
    def config_file(self) -> Path:
        return self.data_dir / "redis.conf"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "devstack-redis.json"

    def _log_files(self) -> list[Path]:
        return [self.console_log, self.server_log]

    @property
    def cmdline_markers(self) -> list[str]:
        # redis-server rewrites its process title to "redis-server HOST:PORT".
        return ["redis-server", f"{HOST}:{self.port}"]

    def _saved_port(self) -> int | None:
        try:
            return int(json.loads(self.state_file.read_text())["port"])
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            return None

    def _prepare(self) -> None:
        redis_server_binary()
        if self._port is None:
            self._port = free_port()
        self.state_file.write_text(json.dumps({"port": self._port}) + "\n")
        lines = [
            f"bind {HOST}",
            f"port {self._port}",
            "protected-mode yes",
            "daemonize no",
            f'dir "{self.data_dir}"',
            f'logfile "{self.server_log}"',
            "loglevel notice",
            'save ""',
        ]
        if self.aof:
            lines += ["appendonly yes", "appendfsync always"]
        else:
            lines += ["appendonly no"]
        if self.tls is not None:
            if self._tls_port is None:
                self._tls_port = free_port()
            lines += [
                f"tls-port {self._tls_port}",
                f'tls-cert-file "{self.tls.cert}"',
                f'tls-key-file "{self.tls.key}"',
                f'tls-ca-cert-file "{self.tls.ca}"',
                "tls-auth-clients no",
            ]
        lines += self._extra_config()
        self.config_file.write_text("\n".join(lines) + "\n")

    def _extra_config(self) -> list[str]:
        """More ``redis.conf`` lines, for subclasses."""
        return []

    def _command(self) -> list[str]:
        return [redis_server_binary(), str(self.config_file)]

    def _ready(self, budget: float) -> bool:
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=budget, socket_connect_timeout=budget)
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused while binding, BusyLoadingError while reading the AOF
            return False
        finally:
            client.close()
