"""The version matrix: the core integration scenarios (tests/support/core.py) against every tested
Kafka release, on the oldest and the newest dependency versions pyproject.toml allows, with each
Python interpreter given (``BRIDGE_MATRIX_PYTHONS``, comma-separated commands; default the one
running this).

Each combination runs in a virtualenv of its own under ``.venv-matrix/`` (installed once, again
when pyproject.toml or the constraints change) as a separate pytest session whose brokers run
the Kafka version under test. A 3.9 broker serves no KIP-848 group, so its combinations leave
that scenario out of their selection (``selection``), by name. Each run appends a row to
``.cache/matrix/results.jsonl``; ``python -m tests.matrix.report`` writes the table of
docs/compatibility.md from them.

    .venv/bin/python -m pytest -m matrix tests/matrix                         # every combination
    .venv/bin/python -m pytest -m matrix tests/matrix -k "3.9.2 and newest"   # one
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import TESTED_KAFKA_VERSIONS
from tests.support.bridge_proc import REPO
from tests.support.core import CORE, selection

pytestmark = [pytest.mark.matrix, pytest.mark.timeout(3600)]

RESULTS = REPO / ".cache" / "matrix" / "results.jsonl"
#: Dependency sets: the floors of pyproject.toml, and the newest versions tested.
DEPENDENCIES = {"oldest": REPO / "constraints" / "floors.txt", "newest": REPO / "constraints" / "newest.txt"}
RUNTIME = ("confluent-kafka", "dramatiq", "redis", "pydantic", "pydantic-settings", "prometheus-client")


def pythons() -> list[str]:
    given = os.environ.get("BRIDGE_MATRIX_PYTHONS")
    return [p.strip() for p in given.split(",") if p.strip()] if given else [sys.executable]


def python_version(command: str) -> str:
    done = subprocess.run([command, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.strip()


def pins(constraints: Path) -> dict[str, str]:
    lines = (line.split("#", 1)[0].strip() for line in constraints.read_text().splitlines())
    return {name.lower(): version for name, _, version in (line.partition("==") for line in lines if line)}


def virtualenv(python: str, dependencies: str) -> Path:
    """A virtualenv of ``python`` with the package, its test extra and ``dependencies`` pinned: the
    project's own (.venv, .venv-floors) when it holds exactly those versions, else one of its own."""
    constraints = DEPENDENCIES[dependencies]
    for existing in (Path(sys.prefix), REPO / ".venv-floors"):
        runs = existing / "bin" / "python"
        if runs.exists() and python_version(str(runs)) == python_version(python) and installed(existing) == pins(
            constraints
        ):
            return existing
    venv = REPO / ".venv-matrix" / f"py{python_version(python)}-{dependencies}"
    stamp = venv / ".installed"
    wanted = (REPO / "pyproject.toml").read_text() + constraints.read_text()
    if not (venv / "bin" / "python").exists():
        # A virtualenv's interpreter builds another from its base installation.
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    if not stamp.exists() or stamp.read_text() != wanted:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints),
                        "-e", ".[test]"], cwd=REPO, check=True, timeout=1800)
        stamp.write_text(wanted)
    return venv


def installed(venv: Path) -> dict[str, str]:
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                          capture_output=True, text=True, check=True, timeout=120)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(done.stdout)
            if p["name"].lower().replace("_", "-") in RUNTIME}


@pytest.mark.parametrize("python", [pytest.param(p, id=f"py{python_version(p)}") for p in pythons()])
@pytest.mark.parametrize("dependencies", ["oldest", "newest"])
@pytest.mark.parametrize("kafka_version", TESTED_KAFKA_VERSIONS)
def test_the_core_scenarios_pass_on_each_kafka_release_and_each_end_of_the_dependency_ranges(
    kafka_version: str, dependencies: str, python: str,
) -> None:
    venv = virtualenv(python, dependencies)
    chosen = selection(kafka_version)
    subprocess.run([str(venv / "bin" / "python"), "-m", "devstack", "fetch-kafka", "--version", kafka_version],
                   cwd=REPO, check=True, capture_output=True, timeout=1800)
    log = RESULTS.parent / f"py{python_version(python)}-{dependencies}-kafka-{kafka_version}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", *chosen],
            cwd=REPO, env={**os.environ, "BRIDGE_TEST_KAFKA_VERSION": kafka_version},
            stdout=out, stderr=subprocess.STDOUT, timeout=3000,
        )
    seconds = time.monotonic() - began
    summary = _summary(log.read_text(errors="replace"))
    row = {
        "python": python_version(python), "kafka": kafka_version, "dependencies": dependencies,
        **installed(venv), "scenarios": len(chosen), "left_out": sorted(set(CORE) - set(chosen)),
        "summary": summary, "ok": done.returncode == 0, "seconds": round(seconds), "at": int(time.time()),
    }
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    assert done.returncode == 0, f"{summary}; log in {log}"
    assert re.match(r"\d+ passed in", summary), summary  # nothing failed, skipped or deselected


def _summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return lines[-1] if lines else "no summary line"
