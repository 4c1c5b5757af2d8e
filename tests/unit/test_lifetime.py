"""A child tied to its parent dies with it; inside ``outliving()`` and off the main thread it is not tied.

Real processes (a Python parent and its ``sleep`` child), no services: the kernel is the subject.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.lifetime import outliving, tied_to_this_process
from devstack.process import read_cmdline

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# Starts `sleep` tied to itself (or inside outliving() when asked), reports the child's pid, then
# waits for its stdin to close.
_PARENT = """
import contextlib, subprocess, sys
from devstack.lifetime import outliving, tied_to_this_process
scope = outliving() if sys.argv[1] == "outlive" else contextlib.nullcontext()
with scope:
    child = subprocess.Popen(["sleep", "600"], preexec_fn=tied_to_this_process(), start_new_session=True)
print(child.pid, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def parent_with_child(mode: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, mode], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert alive(child)
        yield parent, child
    finally:
        parent.kill()
        parent.wait()
        if alive(child):
            os.kill(child, signal.SIGKILL)


def alive(pid: int) -> bool:
    argv = read_cmdline(pid)
    return argv is not None and argv[:2] == ["sleep", "600"]


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_tied_child_is_killed_when_its_parent_is_killed() -> None:
    with parent_with_child("tie") as (parent, child):
        parent.kill()
        parent.wait()
        assert gone_within(child, 5), f"sleep (pid {child}) outlived its SIGKILLed parent"


def test_a_child_started_inside_outliving_keeps_running_after_its_parent_exits() -> None:
    with parent_with_child("outlive") as (parent, child):
        assert parent.stdin is not None
        parent.stdin.close()
        assert parent.wait(10) == 0
        assert not gone_within(child, 1), f"sleep (pid {child}) died with its parent"


def test_outliving_ends_with_its_block_even_when_the_block_raises() -> None:
    assert tied_to_this_process() is not None
    with pytest.raises(RuntimeError), outliving():
        assert tied_to_this_process() is None
        raise RuntimeError("boom")
    assert tied_to_this_process() is not None


def test_a_child_started_off_the_main_thread_is_not_tied_to_that_thread() -> None:
    # The kernel would signal the child when the starting thread ends, not when the process does.
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(tied_to_this_process()))
    thread.start()
    thread.join()
    assert found == [None]
