"""rabbitmq-server from the system package, one node per data dir on the loopback interface.

Erlang nodes register with a port mapper daemon (epmd) that normally outlives them; this node
gets a private epmd on its own port, started and stopped with it, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from devstack.lifetime import tied_to_this_process
from devstack.ports import HOST, free_port
from devstack.process import Service, ServiceError

#: The server script of Debian's package (/usr/sbin/rabbitmq-server would switch users).
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: AMQP 0-9-1 protocol header; a broker answers it with a Connection.Start method frame.
_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


def rabbitmq_server_binary() -> str:
    if not os.access(SERVER, os.X_OK):
        raise ServiceError("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    return SERVER


def _epmd_binary() -> str:
    found = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
    if found is None:
        raise ServiceError("epmd (Erlang) not found; it comes with rabbitmq-server")
    return str(found)


class RabbitServer(Service):
    """A RabbitMQ node whose database, logs and config live in ``data_dir``.

    The guest user (password guest) may connect from the loopback interface only, which is
    the only interface the node listens on. The ports are kept in ``devstack-rabbitmq.json`` so
    a restart serves the same URL.
    """

    name = "rabbitmq"

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__(data_dir)
        self._ports: dict[str, int] = self._saved_ports()
        if port is not None:
            self._ports["amqp"] = port
        self._epmd: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if "amqp" not in self._ports:
            raise ServiceError(f"rabbitmq in {self.data_dir} has no port yet: start it first")
        return self._ports["amqp"]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "devstack-rabbitmq.json"

    @property
    def node(self) -> str:
        return f"kdb{self.port}@localhost"

    @property
    def cmdline_markers(self) -> list[str]:
        # The node name reaches the VM through the environment only; HOME (the data dir) is an argument.
        return ["beam", "-home", str(self.data_dir)]

    def _log_files(self) -> list[Path]:
        return [self.console_log, *sorted((self.data_dir / "log").glob("*.log"))]

    def _saved_ports(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return {}

    def _prepare(self) -> None:
        rabbitmq_server_binary()
        for name in ("amqp", "dist", "epmd"):
            if name not in self._ports:
                self._ports[name] = free_port()
        self.state_file.write_text(json.dumps(self._ports) + "\n")
        (self.data_dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = {HOST}:{self.port}",
                    # Tests run on shared disks: do not block publishers at the default 50 MB.
                    "disk_free_limit.absolute = 10MB",
                    "log.console = false",
                    "log.file.level = warning",
                ]
            )
            + "\n"
        )
        (self.data_dir / "enabled_plugins").write_text("[].\n")
        (self.data_dir / "rabbitmq-env.conf").write_text("")
        self._epmd = subprocess.Popen(
            [_epmd_binary(), "-port", str(self._ports["epmd"]), "-address", HOST],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=tied_to_this_process(),
        )

    def _command(self) -> list[str]:
        return [rabbitmq_server_binary()]

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        data = self.data_dir
        env = {
            **os.environ,
            "HOME": str(data),  # the Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self._ports["dist"]),
            "ERL_EPMD_PORT": str(self._ports["epmd"]),
            "RABBITMQ_MNESIA_BASE": str(data / "mnesia"),
            "RABBITMQ_LOG_BASE": str(data / "log"),
            "RABBITMQ_CONFIG_FILE": str(data / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(data / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(data / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(data / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(data / "rabbitmq.beam.pid"),
            # The script then execs the Erlang VM instead of running it as its own child: the pid
            # we start (and write to the pidfile) is the VM's, and SIGTERM reaches it directly.
            "RUNNING_UNDER_SYSTEMD": "true",
        }
        with self.console_log.open("ab") as log:
            return subprocess.Popen(
                argv, cwd=data, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=tied_to_this_process(),
            )

    def _ready(self, budget: float) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=budget) as conn:
                conn.settimeout(budget)
                conn.sendall(_PROTOCOL_HEADER)
                frame = conn.recv(7)
        except OSError:
            return False
        # A method frame (type 1) on channel 0: Connection.Start.
        return len(frame) == 7 and frame[0] == 1 and frame[1:3] == b"\x00\x00"

    def stop(self, timeout: float = 30) -> None:
        try:
            super().stop(timeout)
        finally:
            self._stop_epmd()

    def kill(self) -> None:
        try:
            super().kill()
        finally:
            self._stop_epmd()

    def _stop_epmd(self) -> None:
        epmd, self._epmd = self._epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                epmd.wait(5)
            if epmd.poll() is None:
                epmd.kill()
                epmd.wait()
