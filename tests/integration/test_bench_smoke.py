"""The comparison harness runs end to end on a tiny workload: every contender, a table, counted fires.

Not a benchmark (nothing here asserts a speed): it proves ``python -m bench.compare`` still starts
chronoq, Celery beat, RedBeat and the APScheduler script, sees their messages on the queue and
writes the page, the chart and the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CONTENDERS = ("chronoq", "beat", "redbeat", "apscheduler")


@pytest.mark.timeout(90)
def test_compare_runs_every_contender_on_a_tiny_workload(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "bench.compare", "--workloads", "w1", "--repeats", "1"),
        *("--w1-sizes", "20", "--w1-periods", "1", "--w1-min-window", "3", "--w1-warm", "1"),
        *("--ceiling-count", "200", "--ceiling-rounds", "2", "--out-dir", str(tmp_path)),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stdout + done.stderr

    results = json.loads((tmp_path / "latest.json").read_text())
    runs = {run["contender"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(CONTENDERS)
    for name, run in runs.items():
        assert run["ok"], f"{name}: {run.get('error')}"
        assert run["expected"] == 20 * 3, name
        # A loaded machine may delay a fire past its window; it must still arrive for most slots.
        assert run["arrived"] >= run["expected"] // 2, f"{name}: {run}"
        assert run["lag_p50_ms"] is not None, name
    assert all(rate > 0 for rate in results["ceiling"]["medians"].values())

    page = (tmp_path / "benchmarks.md").read_text()
    section = page.split("### 20 jobs every 1 s", 1)[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| contender")]
    assert [row.split("|")[1].strip() for row in rows] == [*CONTENDERS]
    assert (tmp_path / "img" / "w1-lag-20x1s.png").stat().st_size > 0
