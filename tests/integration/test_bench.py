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


pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_the_quick_benchmark_completes_every_scenario_and_reports_every_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=540,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    assert result["complete"] is True
    assert result["failures"] == [], "every run processed and committed exactly the records produced"
    rows = {row["id"]: row for row in result["targets"]}
    assert set(rows) >= TARGETS
    assert all(isinstance(rows[t]["value"], (int, float)) and rows[t]["value"] > 0 for t in TARGETS - {"T7"})
    assert rows["T1"]["baseline"] > 0 and rows["T2"]["baseline"] > 0, "the baselines ran in the same invocation"
    assert "T1" in run.stdout and "T7" in run.stdout, "the table is printed"
