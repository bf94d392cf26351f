"""``--check``: offline validation and previews of the next fire times."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scheduler.check import run_check
from shared.errors import EX_CONFIG
from shared.settings import SchedulerSettings

SETTINGS = SchedulerSettings()
AFTER = datetime(2026, 3, 28, 12, tzinfo=UTC)
JOBS = """\
jobs:
  - id: nightly-report
    task: reports.build
    cron: "30 2 * * *"
    timezone: Europe/Berlin
  - id: heartbeat
    task: demo.sleep
    interval: {minutes: 5}
  - id: launch
    task: demo.number_sum
    date: "2026-12-01T09:00:00+01:00"
  - id: paused
    task: demo.sleep
    interval: 10
    enabled: false
"""


def check(paths: list[Path], *, as_json: bool, count: int = 2, after: datetime | None = AFTER) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_check(paths, SETTINGS, "cron_queue", count, after, as_json, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(JOBS, encoding="utf-8")
    return path


def test_json_output_is_exactly_ids_and_next_times(jobs_file: Path) -> None:
    code, out, err = check([jobs_file], as_json=True)
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "jobs": [
            {"id": "nightly-report", "next": ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]},
            {"id": "heartbeat", "next": ["2026-03-28T12:05:00+00:00", "2026-03-28T12:10:00+00:00"]},
            {"id": "launch", "next": ["2026-12-01T08:00:00+00:00"]},
            {"id": "paused", "next": []},
        ]
    }


def test_text_output_has_one_block_per_job(jobs_file: Path) -> None:
    code, out, err = check([jobs_file], as_json=False)
    assert (code, err) == (0, "")
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 5  # four jobs and the summary
    assert blocks[0].splitlines() == [
        f"nightly-report  ({jobs_file})",
        "  task      reports.build -> queue cron_queue",
        "  schedule  cron 30 2 * * * Europe/Berlin",
        "  next      2026-03-29T03:00:00+02:00  (2026-03-29 01:00:00 UTC)",
        "            2026-03-30T02:30:00+02:00  (2026-03-30 00:30:00 UTC)",
    ]
    assert "every 5m" in blocks[1]
    assert "disabled" in blocks[3]
    assert blocks[4].startswith("4 job(s) in 1 file(s) are valid")


def test_invalid_files_print_every_problem_to_err_and_exit_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('jobs:\n  - {id: a, task: t.a, cron: "61 * * * *"}\n  - {id: b, task: t.a, crn: "0 2 * * *"}\n')
    missing = tmp_path / "missing.toml"
    code, out, err = check([bad, missing], as_json=True)
    assert (code, out) == (EX_CONFIG, "")
    assert err.splitlines() == [
        f"{missing}: no such job file",
        f"{bad}: jobs[0] (a): cron '61 * * * *': minute must be 0-59",
        f"{bad}: jobs[1] (b): needs exactly one of cron, interval or date, got none",
        f"{bad}: jobs[1] (b): unknown key 'crn'",
        "4 problem(s) found; nothing was scheduled",
    ]


def test_naive_after_is_utc_and_default_is_now(jobs_file: Path) -> None:
    naive = check([jobs_file], as_json=True, after=AFTER.replace(tzinfo=None))
    assert naive == check([jobs_file], as_json=True)
    before = datetime.now(UTC)
    _, out, _ = check([jobs_file], as_json=True, count=1, after=None)
    heartbeat = json.loads(out)["jobs"][1]["next"][0]
    assert datetime.fromisoformat(heartbeat) > before
