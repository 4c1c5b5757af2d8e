"""How much CPU processes that the benchmark did not start took while it ran.

On a 2-core machine any other busy process changes every figure, so the benchmark measures that
load instead of assuming a quiet machine: a thread reads the CPU time of every process in /proc
once a second and splits it into this process tree and everything else.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

_TICKS = os.sysconf("SC_CLK_TCK")
_MARKERS = ("kafka.Kafka", "redis-server", "dramatiq", "bridge", "pytest")


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far)."""
    found: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, ... utime and stime are fields 14 and 15 of stat(5).
        found[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS)
    return found


def _tree(processes: dict[int, tuple[int, float]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, []))
    return tree


def other_processes() -> list[str]:
    """Kafka, Redis, dramatiq, bridge and pytest processes outside this process tree."""
    ours = _tree(_processes(), os.getpid())
    others = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if int(cmdline.parent.name) in ours:
            continue
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if any(marker in argv for marker in _MARKERS):
            others.append(f"{cmdline.parent.name} {argv[:110]}")
    return others


#: Components of a run, by a marker in their command line; the benchmark process itself is "bench".
_COMPONENTS = (("kafka", "kafka.Kafka"), ("redis", "redis-server"), ("workers", "dramatiq"), ("bridge", "-m bridge"))


def by_component() -> dict[str, float]:
    """CPU seconds used so far by the processes of this tree, summed per component."""
    processes = _processes()
    totals = {name: 0.0 for name, _ in _COMPONENTS} | {"bench": 0.0}
    for pid in _tree(processes, os.getpid()):
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        name = "bench" if pid == os.getpid() else next((n for n, marker in _COMPONENTS if marker in argv), None)
        if name is not None:
            totals[name] += processes[pid][1]
    return totals


def cpu_ms_per_record(before: dict[str, float], after: dict[str, float], records: int) -> dict[str, float]:
    """CPU milliseconds per record of each component between two :func:`by_component` readings
    (a process started in between counts from zero)."""
    spent = {name: max(after[name] - before.get(name, 0.0), 0.0) for name in after}
    spent["total"] = sum(spent.values())
    return {name: round(seconds * 1000 / max(records, 1), 3) for name, seconds in spent.items()}


class CpuWatch:
    """Accumulates the CPU seconds of processes outside this tree, sampled every second."""

    def __init__(self) -> None:
        self.other_cpu_s = 0.0
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cpu-watch", daemon=True)
        self._sample(first=True)

    def _sample(self, first: bool = False) -> None:
        processes = _processes()
        ours = _tree(processes, os.getpid())
        added = 0.0
        for pid, (_, cpu) in processes.items():
            before = self._seen.get(pid)
            self._seen[pid] = cpu
            if not first and pid not in ours:
                # A process born since the last sample counts from zero.
                added += cpu - (before if before is not None else 0.0)
        for pid in set(self._seen) - set(processes):
            del self._seen[pid]
        with self._lock:
            self.other_cpu_s += added

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def mark(self) -> tuple[float, float]:
        """A point to measure from: (wall time, other CPU seconds so far)."""
        self._sample()
        with self._lock:
            return time.time(), self.other_cpu_s

    def since(self, mark: tuple[float, float]) -> dict[str, Any]:
        """Other processes' CPU use since ``mark``, in seconds and as a share of all cores."""
        now, cpu = self.mark()
        wall = max(now - mark[0], 1e-9)
        return {"other_cpu_s": round(cpu - mark[1], 2), "other_cpu_share": round((cpu - mark[1]) / wall / _cores(), 3)}

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)


def _cores() -> int:
    return os.cpu_count() or 1


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []
