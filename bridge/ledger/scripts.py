"""The ledger's Lua scripts: each is ``lua/common.lua`` followed by its own file, and a refusal
inside one is named by the command on the refused line."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import redis

from ..errors import LedgerAccessDenied, LedgerUnavailable
from .connection import failure as _refused_or_down


def script(name: str, *, common: bool = True) -> str:
    lua = resources.files("bridge.ledger").joinpath("lua")
    prelude = lua.joinpath("common.lua").read_text() + "\n" if common else ""
    return prelude + lua.joinpath(f"{name}.lua").read_text()


SCRIPTS = (
    "start", "finish", "many", "batch", "stage", "beat", "stale", "handover", "bump", "fail", "prune", "settle",
)

#: Scripts of the operator commands (:mod:`bridge.ledger.control`); ``control`` has no prelude.
OPERATOR_SCRIPTS = ("skip", "unstage", "reset")

#: Every script's source by its SHA1, to name the command a refused script needed.
_SOURCES = {
    hashlib.sha1(source.encode()).hexdigest(): source
    for source in [*(script(name) for name in (*SCRIPTS, *OPERATOR_SCRIPTS)), script("lanes_seen", common=False),
                   script("lanes_expired", common=False), script("control", common=False),
                   script("pauses", common=False)]
}
_SCRIPT_LINE = re.compile(r"script: (?P<sha>[0-9a-f]{40}), on @user_script:(?P<line>\d+)")
_CALL = re.compile(r"redis\.call\('(?P<command>[A-Z]+)'")


def failure(what: str, error: redis.RedisError) -> LedgerUnavailable | LedgerAccessDenied:
    """Translate ``error``; a refusal inside a script names the command on the refused line."""
    hint = ""
    found = _SCRIPT_LINE.search(str(error))
    if found and (source := _SOURCES.get(found["sha"])):
        lines = source.splitlines()
        number = int(found["line"])
        call = _CALL.search(lines[number - 1]) if 0 < number <= len(lines) else None
        if call:
            hint = f" (a script needs the {call['command'].lower()} command)"
    return _refused_or_down(what, error, hint)
