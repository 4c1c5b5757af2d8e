"""Child processes that are started, watched and signalled only by the object that owns them."""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeVar

from devstack.lifetime import tied_to_this_process

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A service could not be prepared, started or stopped."""


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file, or a note that it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(data.splitlines()[-lines:])


def read_cmdline(pid: int) -> list[str] | None:
    """Command line of a live process, or None if there is no such process (or it is a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not raw:
        return None  # zombies and kernel threads have an empty command line
    return [part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0")]


def process_rss(pid: int) -> int | None:
    """Resident set size of a live process in bytes, from /proc; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def read_pidfile(path: Path) -> int | None:
    """Pid written in ``path``, or None when the file is missing or garbled."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def matching_pid(pidfile: Path, markers: Sequence[str]) -> int | None:
    """Pid from ``pidfile`` if that process is alive and every marker appears in its command line.

    A pidfile can outlive its process and the pid can be reused by anything, so a
    bare pid is never trusted.
    """
    pid = read_pidfile(pidfile)
    if pid is None:
        return None
    argv = read_cmdline(pid)
    if argv is None:
        return None
    joined = "\0".join(argv)
    return pid if all(marker in joined for marker in markers) else None


def stop_foreign_pid(pid: int, timeout: float) -> None:
    """SIGTERM a process that is not our child, then SIGKILL it after ``timeout`` seconds.

    Used only for pids vetted by :func:`matching_pid`; we cannot ``wait()`` on a
    process we did not start, so its exit is observed through /proc.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a paused process would never act on SIGTERM
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_cmdline(pid) is None:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while read_cmdline(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def poll(
    predicate: Callable[[], T | None],
    timeout: float,
    explain: Callable[[], str],
    *,
    transient: tuple[type[BaseException], ...] = (),
    interval: float = 0.1,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Exceptions of the ``transient`` types count as "not yet" (a node that is down does not
    answer). After ``timeout`` seconds raises :class:`ServiceError` with ``explain()``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except transient:
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ServiceError(f"after {max(timeout, 0):.0f}s: {explain()}")
        time.sleep(interval)


def stop_foreign_pids(pids: Sequence[int], timeout: float) -> None:
    """:func:`stop_foreign_pid` for several processes told at once: members of a quorum stop together."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        stop_foreign_pid(pid, max(0.0, deadline - time.monotonic()))


def wait_all_ready(services: Sequence[Service], timeout: float) -> None:
    """Wait until every launched service in ``services`` answers, probing them in turn.

    For servers that become ready only together (a quorum), so a member that exits is
    reported at once, by name and with its logs, instead of after the others time out.
    On any failure every one of them is killed and :class:`ServiceError` raised.
    """
    deadline = time.monotonic() + timeout
    pending = list(services)
    try:
        while pending:
            for service in list(pending):
                proc = service._proc
                if proc is None:
                    raise ServiceError(f"{service.name} in {service.data_dir} was not launched")
                code = proc.poll()
                if code is not None:
                    raise ServiceError(
                        f"{service.name} in {service.data_dir} exited with code {code} during start-up\n"
                        f"{service.log_tails()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(f"{s.name} ({s.data_dir})" for s in pending)
                    tails = "\n".join(s.log_tails() for s in pending)
                    raise ServiceError(f"{names} did not answer within {timeout:.0f}s\n{tails}")
                if service._ready(min(remaining, 1.0)):
                    pending.remove(service)
            if pending:
                time.sleep(0.05)
    except BaseException:
        for service in services:
            service.kill()
        raise


def stop_all(services: Sequence[Service], timeout: float) -> None:
    """SIGTERM every service at once, wait for all of them, SIGKILL those still alive after ``timeout``.

    Members of a quorum shut down cleanly only while a majority of them still runs, so
    they are told to stop together rather than one after the other.
    """
    for service in services:
        service._signal(signal.SIGCONT)
        service._signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for service in services:
        proc = service._proc
        if proc is None:
            continue
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service._signal(signal.SIGKILL)
            proc.wait()
        service._forget()


class Service(abc.ABC):
    """A server process living in ``data_dir``, started and stopped by this object.

    Subclasses describe how to configure the server, how to launch it and how to
    tell that it answers; this class owns the process and its lifecycle.
    """

    #: Short name used for the pidfile and console log in the data dir.
    name: str = "service"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to be provided by subclasses -------------------------------------------------

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Create the data dir contents (config files, storage) needed before launch."""

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """argv of the server process."""

    @abc.abstractmethod
    def _ready(self, budget: float) -> bool:
        """True once the server answers a real request; may block up to ``budget`` seconds."""

    def _log_files(self) -> list[Path]:
        """Files whose tails explain a failed start."""
        return [self.console_log]

    @property
    @abc.abstractmethod
    def cmdline_markers(self) -> list[str]:
        """Strings that the command line of this data dir's server process contains."""

    def detached_pid(self) -> int | None:
        """Pid of a server for this data dir started by another process (``python -m devstack up``).

        Found through the pidfile and accepted only if the live process's command
        line carries :attr:`cmdline_markers`.
        """
        try:
            markers = self.cmdline_markers
        except ServiceError:  # never configured, so never started
            return None
        return matching_pid(self.pidfile, markers)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def pidfile(self) -> Path:
        return self.data_dir / f"{self.name}.pid"

    @property
    def console_log(self) -> Path:
        """stdout and stderr of the server process."""
        return self.data_dir / f"{self.name}.out"

    @property
    def pid(self) -> int | None:
        """Pid of the running process, None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def rss_bytes(self) -> int | None:
        """Resident memory of the running process, None when it is not running."""
        pid = self.pid
        return None if pid is None else process_rss(pid)

    def start(self, timeout: float = 120) -> float:
        """Prepare and launch the server, block until it answers, return the seconds that took.

        The seconds include preparation (config, first-time storage formatting);
        ``timeout`` counts from the launch. Raises :class:`ServiceError` (with the
        tail of its logs) if the process exits or does not answer in time; the
        process is killed in that case.
        """
        began = time.monotonic()
        self.launch()
        self.wait_ready(timeout)
        return time.monotonic() - began

    def launch(self) -> None:
        """Prepare and spawn the server without waiting for it to answer.

        For servers that can only answer together (the members of a quorum): launch
        each, then :meth:`wait_ready` on each. A failure while preparing leaves
        nothing running.
        """
        if self.running:
            raise ServiceError(f"{self.name} in {self.data_dir} is already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self._proc = self._spawn(self._command())
        self.pidfile.write_text(f"{self._proc.pid}\n")

    def wait_ready(self, timeout: float) -> None:
        """Block until the launched server answers; kill it and raise :class:`ServiceError` otherwise."""
        if self._proc is None:
            raise ServiceError(f"{self.name} in {self.data_dir} was not launched")
        deadline = time.monotonic() + timeout
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise ServiceError(
                        f"{self.name} in {self.data_dir} exited with code {code} during start-up\n{self.log_tails()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceError(
                        f"{self.name} in {self.data_dir} did not answer within {timeout:.0f}s\n{self.log_tails()}"
                    )
                if self._ready(min(remaining, 2.0)):
                    return
                time.sleep(0.05)
        except BaseException:
            # Whatever interrupted the start (timeout, Ctrl-C, a probe bug), a
            # half-started server must not outlive it.
            self.kill()
            raise

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the server and wait for it; SIGKILL it if it is still alive after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(signal.SIGCONT)  # a paused process would never act on SIGTERM
            self._signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server and reap it: an abrupt crash, nothing flushed."""
        proc = self._proc
        if proc is None:
            return
        self._signal(signal.SIGKILL)
        proc.wait()
        self._forget()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: sockets stay open but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` with SIGCONT."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 120) -> float:
        """Graceful stop, then start on the same data dir; return the start-up seconds."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        log: IO[bytes]
        with self.console_log.open("ab") as log:
            # A new session keeps a terminal's Ctrl-C away from the server: only
            # stop(), or the end of this process, decides when it ends.
            return subprocess.Popen(
                argv,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=tied_to_this_process(),
            )

    def _signal(self, sig: signal.Signals) -> None:
        # poll() reaps an exited child, and an unreaped child keeps its pid, so a
        # pid that passes this check cannot belong to anyone else.
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def _forget(self) -> None:
        if self._proc is not None and read_pidfile(self.pidfile) == self._proc.pid:
            self.pidfile.unlink(missing_ok=True)
        self._proc = None

    def log_tails(self) -> str:
        """The tails of the files that explain what the server did, each under its path."""
        return "\n".join(f"--- {path} ---\n{tail(path)}" for path in self._log_files())
