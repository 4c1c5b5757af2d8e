"""Names of running copies: the token of each copy and the worker (thread) that runs it."""

from __future__ import annotations

import itertools
import os
import socket
import threading

_TOKENS = itertools.count()
_NONCE = os.urandom(6).hex()
_HOST = socket.gethostname()


def new_token() -> str:
    """Unique among the copies any process registers: a per-process nonce and a counter (a
    system call per record, as os.urandom, measurably costs)."""
    return f"{_NONCE}{next(_TOKENS):x}"


def _reseed() -> None:
    global _NONCE, _TOKENS
    _NONCE, _TOKENS = os.urandom(6).hex(), itertools.count()


os.register_at_fork(after_in_child=_reseed)  # forked worker processes must not share tokens


def process_id() -> str:
    return f"{_HOST}:{os.getpid()}"


def worker_id() -> str:
    """The calling thread, as a running copy's registration names it."""
    return f"{_HOST}:{os.getpid()}:{threading.get_ident()}"
