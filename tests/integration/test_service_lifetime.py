"""Every process devstack starts for a service ends when the process that started it is SIGKILLed.

A test session killed or aborted runs no cleanup; what it started must not run on as orphans.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import KafkaServer, RedisServer
from devstack.process import Service, read_cmdline, stop_foreign_pids
from tests.support.bridge_proc import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"),
]

# Starts one service the way tests do, prints the command-line markers of its server processes,
# then waits for its stdin to close. The dramatiq workers get a redis-server to consume from.
_PARENT = """
import json, os, sys
from pathlib import Path
from devstack import DramatiqWorkers, KafkaServer, RabbitServer, RedisServer

kind, data = sys.argv[1], Path(sys.argv[2])
if kind == "dramatiq":
    redis = RedisServer(data / "redis")
    redis.start()
    workers = DramatiqWorkers(
        ["tests.support.echo_actors"], processes=2, threads=2, log_path=data / "dramatiq.log",
        env={**os.environ, "ECHO_ACTORS_REDIS_URL": redis.url},
    )
    workers.start()
    markers = [redis.cmdline_markers, *[["-m", "dramatiq", "tests.support.echo_actors"]] * 3]
else:
    server = {"kafka": KafkaServer, "redis": RedisServer, "rabbitmq": RabbitServer}[kind](data / kind)
    server.start()
    if server.detached_pid() != server.pid:  # the process started, and tied, is the server itself
        sys.exit(f"{kind}: pid {server.pid} is not the server its pidfile and command line name")
    markers = [server.cmdline_markers]
    if kind == "rabbitmq":
        markers.append(["epmd", "-port", str(json.loads(server.state_file.read_text())["epmd"])])
print(json.dumps(markers), flush=True)
sys.stdin.read()
"""

#: Seconds each kind's processes get to be gone: the dramatiq parent stops its workers on SIGTERM.
WITHIN = {"redis": 5.0, "kafka": 5.0, "rabbitmq": 10.0, "dramatiq": 30.0}


def descendants(pid: int) -> dict[int, list[str]]:
    """Every live process below ``pid``, with its command line."""
    found: dict[int, list[str]] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for child in map(int, (task / "children").read_text().split()):
                    argv = read_cmdline(child)
                    if argv is not None:
                        found[child] = argv
                        pending.append(child)
    return found


def still_running(processes: dict[int, list[str]]) -> dict[int, list[str]]:
    """Those of ``processes`` whose pid still runs the same command line (a reused pid runs another)."""
    return {pid: argv for pid, argv in processes.items() if read_cmdline(pid) == argv}


@pytest.mark.parametrize("kind", ["redis", "kafka", "rabbitmq", "dramatiq"])
def test_every_process_of_a_service_ends_when_the_process_that_started_it_is_killed(
    kind: str, tmp_path: Path
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, kind, str(tmp_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    processes: dict[int, list[str]] = {}
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, f"the parent exited with {parent.wait()} before starting {kind}"
        processes = descendants(parent.pid)
        for markers in json.loads(line):
            assert any(all(m in "\0".join(argv) for m in markers) for argv in processes.values()), (markers, processes)

        parent.kill()
        parent.wait()
        deadline = time.monotonic() + WITHIN[kind]
        while still_running(processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert still_running(processes) == {}, f"outlived their SIGKILLed parent: {still_running(processes)}"
    finally:
        parent.kill()
        parent.wait()
        for pid in still_running(processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_services_up_starts_outlive_the_command_until_down_stops_them(tmp_path: Path) -> None:
    def devstack(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devstack", *args, "--data", str(tmp_path)], cwd=REPO, capture_output=True,
            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def running() -> list[int | None]:
        # Made anew each time: a server object reads the ports `up` chose when it is made.
        servers: list[Service] = [KafkaServer(tmp_path / "kafka"), RedisServer(tmp_path / "redis")]
        return [server.detached_pid() for server in servers]

    try:
        up = devstack("up")
        assert up.returncode == 0, up.stderr
        time.sleep(1)  # a service tied to `up` would have been killed with it by now
        pids = running()
        assert None not in pids, (pids, up.stdout)

        down = devstack("down")
        assert down.returncode == 0, down.stderr
        assert running() == [None, None]
        assert all(read_cmdline(pid) is None for pid in pids if pid is not None)
    finally:
        stop_foreign_pids([pid for pid in running() if pid is not None], 10)
