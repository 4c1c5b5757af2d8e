"""The benchmark suite's quick mode runs every scenario to completion (a smoke test, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bridge_proc import REPO

TARGETS = {"T1", "T2", "T3", "T4", "T5-none-p50", "T5-none-p99", "T5-key-p50", "T5-key-p99", "T5-partition-p50",
           "T5-partition-p99", "T6", "T6-ledger-per-in-flight", "T6-ledger-end", "T7"}

#: The P scenarios in a reduced form (few partitions, short windows, one repetition, one rate and
#: one ordering mode where there are several), so that the whole quick run stays a few minutes long.
SMOKE = {
    "p1_partitions": "64", "p1_window_s": "3", "p1_settle_s": "1", "p1_monitor_s": "1",
    "p2_repeats": "1", "p2_silence_s": "3", "p2_orderings": "partition",
    "p3_rates": "200", "p3_orderings": "partition",
    "p4_records": "2000",
    "p7_partitions": "64", "p7_records": "1000",
    "b1_records": "1200",
    "c1_records": "600", "c1_sleeps_ms": "0",
}
P_TARGETS = {"P1-workers", "P1-redis", "P1-bridge", "P1-redis-commands", "P1-bridge-redis-calls",
             "P2-partition-p50", "P2-partition-max", "P3-200-partition-p50", "P3-200-partition-p99",
             "P4-workers", "P4-redis", "P4-bridge", "P5", "P5-handlers", "P6", "P6-rabbitmq", "P7"}
B_TARGETS = {"B1", "B1-per-record", "B1-batch-vs-per-record", "B1-worker-cpu", "B1-per-record-worker-cpu",
             "B1-batch-to-commit"}
C_TARGETS = {"C1-stock", "C1-none-0ms", "C1-partition-0ms", *(f"C1-{o}-0ms-{what}" for o in ("none", "partition")
             for what in ("bridge-cpu", "worker-cpu", "ledger-calls", "ledger-cpu-us", "lanes-calls", "lanes-cpu-us"))}
#: Counts that are 0 when all is well, and a time that may be about 0.
P_COUNTS = {"P1-connection-errors", "P1-consumer-restarts"}
P_TIMES = {"P6-rabbitmq-keeps-up"}


pytestmark = pytest.mark.integration

#: The default run's share: the scenarios of the newest work at their smallest, each beside its
#: baseline; every scenario runs in the slow tier (about ten minutes on two cores).
DEFAULT_RUN = "p1,p7,b1,c1"
DEFAULT_SIZES = {**SMOKE, "p1_partitions": "16", "p7_partitions": "16", "p7_records": "480"}


@pytest.mark.timeout(420)
def test_the_scenarios_of_the_default_run_complete_beside_their_baselines(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    overrides = [arg for name, value in DEFAULT_SIZES.items() for arg in ("--set", f"{name}={value}")]
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--only", DEFAULT_RUN, "--json", str(out), *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failures"] == [], "every run processed and committed exactly the records produced"
    rows = {row["id"]: row for row in result["targets"]}
    wanted = {"P1-workers", "P1-redis", "P7", *B_TARGETS, *C_TARGETS}
    assert set(rows) >= wanted
    assert all(isinstance(rows[t]["value"], (int, float)) and rows[t]["value"] > 0 for t in wanted - {"P1-workers"})
    for row in ("P7", "B1"):
        assert rows[row]["baseline"] > 0, f"{row}: its baseline ran in the same invocation"
    assert all(row in run.stdout for row in ("P1", "P7", "B1", "C1")), "the table is printed"


@pytest.mark.slow
@pytest.mark.timeout(780)
def test_the_quick_benchmark_completes_every_scenario_and_reports_every_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    overrides = [arg for name, value in SMOKE.items() for arg in ("--set", f"{name}={value}")]
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--json", str(out), *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=720,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    assert result["complete"] is True
    assert result["failures"] == [], "every run processed and committed exactly the records produced"
    assert result["parameters"]["p1_partitions"] == 64 and result["parameters"]["p2_orderings"] == ["partition"]
    rows = {row["id"]: row for row in result["targets"]}
    assert set(rows) >= TARGETS | P_TARGETS | P_COUNTS | P_TIMES | B_TARGETS | C_TARGETS
    assert all(isinstance(rows[t]["value"], (int, float)) and rows[t]["value"] > 0 for t in TARGETS - {"T7"})
    assert all(isinstance(rows[t]["value"], (int, float)) and rows[t]["value"] > 0
               for t in P_TARGETS | B_TARGETS | C_TARGETS)
    assert all(isinstance(rows[t]["value"], (int, float)) and rows[t]["value"] >= 0 for t in P_COUNTS)
    assert all(isinstance(rows[t]["value"], (int, float)) for t in P_TIMES)
    assert rows["T1"]["baseline"] > 0 and rows["T2"]["baseline"] > 0, "the baselines ran in the same invocation"
    for row in ("P1-bridge-redis-calls", "P2-partition-p50", "P3-200-partition-p50", "P4-workers", "P7", "B1"):
        assert rows[row]["baseline"] > 0, f"{row}: its baseline ran in the same invocation"
    # Idle stock workers may use no measurable CPU in a 3 s window: the baseline ran, whatever its value.
    assert isinstance(rows["P1-workers"]["baseline"], (int, float)), "P1: the idle stock workers ran"
    assert all(row["met"] in (True, False) for t, row in rows.items() if t in P_COUNTS | {"P1-workers", "P7", "B1"})
    assert all(row in run.stdout for row in ("T1", "T7", "P7", "B1")), "the table is printed"
