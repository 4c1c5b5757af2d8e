"""The stock ``dramatiq`` command line as a subprocess, for tests that need real worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from devstack.lifetime import tied_to_this_process
from devstack.process import ServiceError, tail

READY_LINE = "Worker process is ready for action."


class DramatiqWorkers:
    """``python -m dramatiq MODULES --processes N --threads M`` in its own process group.

    The dramatiq parent forks ``processes`` worker children; :meth:`pids` lists
    them so a test can kill one. Stock dramatiq treats a worker that dies as
    fatal: the parent logs "exited unexpectedly", stops the other workers and
    exits with the dead worker's code. Output of all of them goes to :attr:`log_path`.
    """

    def __init__(
        self,
        modules: list[str],
        *,
        processes: int = 1,
        threads: int = 8,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        if not modules:
            raise ValueError("at least one module with actors is required")
        self.modules = list(modules)
        self.processes = processes
        self.threads = threads
        self.env = env
        self.cwd = cwd
        self.extra_args = list(extra_args or [])
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="dramatiq-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dramatiq",
            *self.modules,
            "--processes",
            str(self.processes),
            "--threads",
            str(self.threads),
            *self.extra_args,
        ]

    @property
    def pid(self) -> int | None:
        """Pid of the dramatiq parent process while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout: float = 60) -> float:
        """Launch the workers and wait until every worker process reports it is ready.

        Returns the seconds that took. Raises :class:`ServiceError` with the log
        tail if dramatiq exits first or is not ready within ``timeout``.
        """
        if self.running:
            raise ServiceError(f"dramatiq workers already running (pid {self.pid})")
        began = time.monotonic()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ if self.env is None else self.env)
        # Unbuffered so the log shows what happened up to a SIGKILL.
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() can reach every child
                # SIGTERM, not SIGKILL: the dramatiq parent then stops the worker processes it
                # forked, which the kernel would not signal.
                preexec_fn=tied_to_this_process(signal.SIGTERM),
            )
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise ServiceError(f"dramatiq exited with code {code} during start-up\n{tail(self.log_path)}")
                if self._ready_count(offset) >= self.processes:
                    return time.monotonic() - began
                if time.monotonic() - began > timeout:
                    raise ServiceError(f"dramatiq workers not ready within {timeout:.0f}s\n{tail(self.log_path)}")
                time.sleep(0.05)
        except BaseException:
            self.kill()  # no half-started worker group outlives a failed start
            raise

    def pids(self) -> list[int]:
        """Pids of the processes the dramatiq parent has forked (its worker processes)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        children: list[int] = []
        for task in Path(f"/proc/{self._proc.pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                children += [int(pid) for pid in (task / "children").read_text().split()]
        return sorted(set(children))

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the parent (it forwards to its workers); SIGKILL the whole group after ``timeout``.

        Returns dramatiq's exit code (negative for a signal), or None if never started.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait()
        # Workers orphaned by a dead parent still carry its process group id.
        self._signal_group(signal.SIGKILL)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the parent and every worker at once."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self._proc.wait()

    def log(self) -> str:
        """Everything the workers have written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _ready_count(self, offset: int) -> int:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace").count(READY_LINE)
        except FileNotFoundError:
            return 0

    def _signal_group(self, sig: signal.Signals) -> None:
        # The group id is the parent's pid (new session). Linux keeps an id
        # reserved while any process uses it as pid or group id, so while the
        # parent is unreaped, or any worker of ours lives, the id is our group.
        # Once the parent is reaped, a process that now owns that pid means the id
        # was recycled and the group is no longer ours.
        if self._proc is None:
            return
        pgid = self._proc.pid
        if self._proc.returncode is not None and Path(f"/proc/{pgid}").exists():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
