"""What redis-server itself says about its work: CPU (``INFO cpu``), calls per command
(``INFO commandstats``), and which client sent which command (``MONITOR``, with the client names
of ``CLIENT LIST``).

``MONITOR`` makes Redis copy every command to the monitoring connection, which costs Redis CPU:
the idle scenario samples it only after its CPU window.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis


@dataclass(frozen=True)
class RedisReading:
    """One look at redis-server's counters."""

    at: float
    cpu_s: float
    calls: dict[str, int]
    #: Microseconds spent executing each command so far (a script's call includes its commands').
    usec: dict[str, int] = dataclasses.field(default_factory=dict)
    #: CPU seconds of the main thread, the one that runs every command (what saturates first).
    main_cpu_s: float = 0.0


def reading(client: redis.Redis) -> RedisReading:
    """CPU seconds (user + system, every thread of the server) and calls per command so far."""
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
    usec = {name.removeprefix("cmdstat_"): int(entry["usec"]) for name, entry in stats.items()}
    main = float(cpu.get("used_cpu_sys_main_thread", 0.0)) + float(cpu.get("used_cpu_user_main_thread", 0.0))
    return RedisReading(time.time(), float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), calls, usec, main)


def between(before: RedisReading, after: RedisReading, *, ignore: tuple[str, ...] = ("info",)) -> dict[str, Any]:
    """CPU share and commands per second between two readings; ``ignore`` leaves out the probe's own calls."""
    seconds = max(after.at - before.at, 1e-9)
    rates = {
        name: (calls - before.calls.get(name, 0)) / seconds
        for name, calls in after.calls.items()
        if name not in ignore and calls > before.calls.get(name, 0)
    }
    top = sorted(rates.items(), key=lambda item: -item[1])
    return {
        "seconds": round(seconds, 2),
        "cpu_percent": round((after.cpu_s - before.cpu_s) / seconds * 100, 3),
        "main_thread_cpu_percent": round((after.main_cpu_s - before.main_cpu_s) / seconds * 100, 3),
        "commands_per_s": round(sum(rates.values()), 1),
        "command_usec_per_s": round(sum(
            usec - before.usec.get(name, 0) for name, usec in after.usec.items() if name not in ignore
        ) / seconds, 1),
        "top_commands_per_s": {name: round(rate, 1) for name, rate in top[:12]},
    }


def client_names(client: redis.Redis) -> dict[str, str]:
    """addr (ip:port) -> client name of every connection (``?`` for a connection without a name)."""
    return {entry["addr"]: entry.get("name") or "?" for entry in client.client_list()}


def monitor(client: redis.Redis, host: str, port: int, seconds: float) -> dict[str, Any]:
    """Commands per second per client name and per command, from ``MONITOR`` for ``seconds``.

    Commands that Lua scripts run are counted apart (``lua``), under their own names: the script
    call itself counts for its client. Connections are named from ``CLIENT LIST`` before, during
    (at most once a second, when an unknown one shows up) and after the sample; one that came and
    went in between counts as ``?``.
    """
    names = client_names(client)
    counts: Counter[tuple[str, str]] = Counter()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"MONITOR\r\n")
        sock.settimeout(0.2)
        pending = b""
        began = looked = time.time()
        while (now := time.time()) - began < seconds:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                raise RuntimeError("redis-server closed the MONITOR connection")
            *lines, pending = (pending + chunk).split(b"\r\n")
            for line in lines:
                addr, command = _parse(line.decode("utf-8", "replace"))
                if addr is None:  # +OK, the answer to MONITOR
                    continue
                if addr != "lua" and addr not in names and now - looked >= 1.0:
                    names.update(client_names(client))
                    looked = now
                counts[addr, command] += 1
        elapsed = time.time() - began
    names.update(client_names(client))
    names["lua"] = "lua"
    per_client: Counter[str] = Counter()
    per_command: dict[str, Counter[str]] = {}
    for (addr, command), n in counts.items():
        name = names.get(addr, "?")
        per_client[name] += n
        per_command.setdefault(name, Counter())[command] += n
    return {
        "seconds": round(elapsed, 2),
        "per_client_per_s": {name: round(n / elapsed, 1) for name, n in per_client.most_common()},
        "per_client_commands_per_s": {
            name: {cmd: round(n / elapsed, 1) for cmd, n in commands.most_common(10)}
            for name, commands in per_command.items()
        },
    }


def _parse(line: str) -> tuple[str | None, str]:
    """``+1700000000.123456 [0 127.0.0.1:5000] "EVALSHA" "..."`` -> ("127.0.0.1:5000", "evalsha")."""
    start, end = line.find("["), line.find("]")
    if start < 0 or end < start:
        return None, ""
    where = line[start + 1 : end].split(" ", 1)
    addr = where[1] if len(where) == 2 else None
    rest = line[end + 1 :].strip()
    command = rest.split('"', 2)[1].lower() if rest.startswith('"') and rest.count('"') >= 2 else "?"
    return addr, command
