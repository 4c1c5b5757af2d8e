"""The machine description, the final tables and the JSON document."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import confluent_kafka

from devstack import KAFKA_VERSION
from tests.bench.results import Measurement, Target
from tests.support.bridge_proc import REPO


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def bridge_digest() -> str:
    """Digest of the bridge's sources as they are on disk (they may hold uncommitted changes)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "bridge").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    """Commit of the checkout and the uncommitted changes, so a result names the code it measured."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    return {
        "commit": git("log", "-1", "--format=%h"),
        "bridge_sources_sha256": bridge_digest(),
        "uncommitted_bridge_files": sorted(p for p in changed if p.startswith("bridge/")),
        "uncommitted_other_files": len([p for p in changed if not p.startswith("bridge/")]),
    }


def machine(redis_version: str) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": _memory_mb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "kafka": KAFKA_VERSION,
        "redis": redis_version,
        "dramatiq": metadata.version("dramatiq"),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "redis_py": metadata.version("redis"),
    }


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}" if abs(value) >= 1 else f"{value:.{digits + 1}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def target_table(targets: list[Target]) -> str:
    rows = []
    for t in targets:
        met = "-" if t.met is None else ("yes" if t.met else "NO")
        rows.append([t.id, f"{_num(t.value)} {t.unit}", _num(t.baseline), _num(t.ratio, 2), t.target, met])
    notes = [f"  {t.id}: {t.note}" for t in targets if t.note]
    return "\n".join([_table(["id", "value", "baseline", "ratio", "target", "met"], rows), *notes])


def measurement_table(measurements: dict[str, Measurement]) -> str:
    rows = []
    for m in measurements.values():
        values = ", ".join(_num(v) for v in m.values) or "-"
        rows.append([m.name, _num(m.median), m.unit, values])
    return _table(["measurement", "median", "unit", "repetitions"], rows)


def document(
    *,
    machine_info: dict[str, Any],
    params: dict[str, Any],
    scenarios: list[str],
    measurements: dict[str, Measurement],
    targets: list[Target],
    notes: list[str],
    failures: list[str],
    started: float,
    complete: bool,
) -> dict[str, Any]:
    return {
        "machine": machine_info,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "mode": params["mode"],
        "complete": complete,
        "git": git_state(),
        "parameters": params,
        "scenarios": scenarios,
        "measurements": {name: m.as_dict() for name, m in measurements.items()},
        "targets": [t.as_dict() for t in targets],
        "notes": notes,
        "failures": failures,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
