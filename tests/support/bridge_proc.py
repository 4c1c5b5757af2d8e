"""The bridge as a subprocess (``python -m bridge run MODULE``), as users run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.process import tail

REPO = Path(__file__).resolve().parents[2]


class BridgeProcess:
    def __init__(self, modules: list[str], env: dict[str, str], *, args: list[str] | None = None,
                 log_path: Path | None = None) -> None:
        self.modules = modules
        self.env = env
        self.args = args or []
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="bridge-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        # The HTTP server is off unless a test asks for it: many bridges share this machine.
        env = {**os.environ, "BRIDGE_HTTP_PORT": "0", **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", *self.modules, *self.args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"bridge exited with {self.proc.returncode}:\n{tail(self.log_path, 60)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"bridge never logged {text!r}:\n{tail(self.log_path, 60)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code (SIGKILL after ``timeout`` fails the caller)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"bridge did not stop within {timeout}s:\n{tail(self.log_path, 60)}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
