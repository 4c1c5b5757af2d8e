"""Service processes end with the process that started them, unless it asks them to outlive it.

A test session killed with SIGKILL, or aborted by a native assertion, runs no cleanup: without this
its brokers and servers would run on as orphans (parent pid 1), holding ports, memory and disk.
On Linux the kernel signals each service when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
elsewhere nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

#: prctl(2) option: the signal the kernel sends the calling process when its parent dies.
_PR_SET_PDEATHSIG = 1

_outliving = False


@contextlib.contextmanager
def outliving() -> Iterator[None]:
    """Services started inside the block keep running after this process exits.

    For ``python -m devstack up``, whose services are found and stopped again through their
    pidfiles by a later ``down``.
    """
    global _outliving
    before, _outliving = _outliving, True
    try:
        yield
    finally:
        _outliving = before


def tied_to_this_process(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` after which the kernel sends the child ``sig``
    when this process ends; None where that cannot or must not be done.

    None on systems other than Linux, inside :func:`outliving`, and off the main thread: the kernel
    signals the child when the *thread* that started it ends, so a child started by a helper thread
    would die with that thread. The setting survives ``exec`` (not of set-user-ID programs) but not
    ``fork``: a service that runs its server as a child of its own must ``exec`` it instead.
    """
    if not sys.platform.startswith("linux") or _outliving or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    # Built here: the child between fork and exec should do as little as it can.
    args = (ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
            ctypes.c_ulong(0))
    parent = os.getpid()

    def tie() -> None:
        if prctl(*args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_PDEATHSIG, {sig.name}): {os.strerror(code)}")
        # A parent that died before the prctl call left no one to signal the child.
        if os.getppid() != parent:
            os._exit(1)

    return tie
