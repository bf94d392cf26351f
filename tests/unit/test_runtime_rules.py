"""The pure rules of jobs changed at runtime (scheduler.planner), API spec validation and
records (scheduler.jobstore), and JSON job files (#13)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scheduler.jobfiles import MAX_FILE_BYTES, parse_job_file
from scheduler.jobstore import JobRecord, parse_record, spec_document, validate_api_spec
from scheduler.planner import backfill_problem, edit_kind, id_conflicts, plan_backfill, refusal
from scheduler.specs import JobDefaults, JobSpec, load_job_specs
from shared.errors import JobSpecError
from shared.fleet import Overlap
from shared.settings import SchedulerSettings

DEFAULTS = JobDefaults.from_settings(SchedulerSettings(), "cron_queue")
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def spec(**fields: Any) -> JobSpec:
    return DEFAULTS.make_spec(**{"id": "j", "task": "demo.sleep", "interval": 10, **fields})


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        ({}, "unchanged"),
        ({"args": [1]}, "values"),
        ({"kwargs": {"a": 1}, "queue": "other", "priority": 3}, "values"),
        ({"max_instances": 3, "jitter": 2.0, "description": "x", "pause_after_failures": 2}, "values"),
        ({"interval": 20}, "trigger"),
        ({"timezone": "Europe/Berlin"}, "trigger"),
        ({"start_date": "2026-01-01T00:00:00+00:00"}, "trigger"),
        ({"enabled": False}, "trigger"),
    ],
)
def test_edit_kind(change: dict[str, Any], kind: str) -> None:
    assert edit_kind(spec(), spec(**change)) == kind


def test_edit_kind_of_a_new_trigger_type() -> None:
    assert edit_kind(spec(), DEFAULTS.make_spec(id="j", task="demo.sleep", cron="* * * * *")) == "trigger"


@pytest.mark.parametrize(
    ("action", "source", "expected"),
    [
        ("update", "api", None),
        ("delete", "api", None),
        ("pause", "configs/jobs.yaml", None),
        ("resume", "code", None),
        ("trigger", "configs/jobs.yaml", None),
        ("backfill", "code", None),
        (
            "update",
            "configs/jobs.yaml",
            "belongs to job file configs/jobs.yaml; update it in that file, not through the API",
        ),
        ("delete", "configs/a.toml", "belongs to job file configs/a.toml; delete it in that file, not through the API"),
        ("update", "code", "is declared in code (TASK_MODULES); update it there, not through the API"),
    ],
)
def test_ownership(action: str, source: str, expected: str | None) -> None:
    assert refusal(action, source) == expected


def test_a_file_job_using_an_api_jobs_id_is_refused_naming_both() -> None:
    from_file = spec(id="shared-id").model_copy(update={"source": "configs/jobs.yaml"})
    other = spec(id="other").model_copy(update={"source": "configs/jobs.yaml"})
    kept, problems = id_conflicts([from_file, other], {"shared-id": "created by ann@host at 2026-12-01"})
    assert kept == [other]
    assert problems == [
        "configs/jobs.yaml: job 'shared-id': id is already used by an API job (created by ann@host at "
        "2026-12-01); rename one of them (the API job keeps running)"
    ]


@pytest.mark.parametrize(
    ("count", "start", "end", "now", "problem"),
    [
        (10, T0, T0 + timedelta(seconds=9), T0 + timedelta(hours=1), None),
        (0, T0, T0, T0, None),
        (1001, T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2), "more than 1000 fires"),
        (1, T0, T0 - timedelta(seconds=1), T0, "is before --from"),
        (1, T0, T0 + timedelta(seconds=1), T0, "in the future"),
    ],
)
def test_backfill_problem(count: int, start: datetime, end: datetime, now: datetime, problem: str | None) -> None:
    found = backfill_problem(count, start, end, now, 1000)
    assert found is None if problem is None else problem in (found or "")


def test_plan_backfill_skips_decided_fires_and_ignores_overlap() -> None:
    job = spec(overlap="skip")
    times = [T0 + timedelta(seconds=10 * i) for i in range(4)]
    now, later = plan_backfill(job, times, [False, True, False, False], T0 + timedelta(hours=1), sequential=False)
    assert ([f.scheduled_at for f in now], later) == ([times[0], times[2], times[3]], [])
    assert {f.trigger for f in now} == {"backfill"}
    assert {f.intent(T0, _limits()).overlap for f in now} == {Overlap.ALLOW}
    first, rest = plan_backfill(job, times, [False] * 4, T0 + timedelta(hours=1), sequential=True)
    assert [f.scheduled_at for f in first] == times[:1]
    assert [f.scheduled_at for f in rest] == times[1:]


def _limits() -> Any:
    from scheduler.fires import Limits

    return Limits(time_limit_s=60)


def test_api_spec_validation_names_job_and_field() -> None:
    with pytest.raises(JobSpecError) as caught:
        validate_api_spec({"id": "x", "task": "demo.sleep", "cron": "61 * * * *", "crn": 1, "priority": 12}, DEFAULTS)
    assert caught.value.problems == [
        "job 'x': cron '61 * * * *': minute must be 0-59",
        "job 'x': priority: input should be less than or equal to 9 (got 12)",
        "job 'x': unknown key 'crn'",
    ]
    with pytest.raises(JobSpecError, match="a job must be a mapping"):
        validate_api_spec(["x"], DEFAULTS)


@pytest.mark.parametrize(
    "document",
    [
        {"id": "a", "task": "demo.sleep", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "args": [2**62]},
        {"id": "b", "task": "demo.sleep", "interval": {"hours": 1, "minutes": 30}, "misfire_grace_time": None},
        {"id": "c", "task": "demo.sleep", "date": "2026-12-01T09:00:00+01:00", "kwargs": {"x": [1.5, "y"]}},
        {"id": "d", "task": "demo.sleep", "cron": {"second": "*/10"}, "pause_after_failures": 3, "priority": 0},
    ],
)
def test_a_stored_record_reads_back_as_the_same_spec(document: dict[str, Any]) -> None:
    original = validate_api_spec(document, DEFAULTS)
    body = JobRecord(id=original.id, spec=spec_document(original)).model_dump_json(exclude={"version"})
    raw = '{"version":3,' + body[1:]  # as jobwrite.lua stores it
    record, again = parse_record(raw)  # no defaults: the record is complete
    assert again == original and record["version"] == 3
    assert spec_document(again) == spec_document(original)


def test_a_stored_record_that_became_invalid_is_refused_naming_the_job() -> None:
    raw = json.dumps({"version": 1, "id": "bad", "spec": {"id": "bad", "task": "demo.sleep", "cron": "61 * * * *"}})
    with pytest.raises(JobSpecError, match="stored: job 'bad': cron '61 \\* \\* \\* \\*': minute must be 0-59"):
        parse_record(raw)


def test_json_job_files_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "generated.json"
    path.write_text(json.dumps({"jobs": [{"id": "g", "task": "demo.sleep", "interval": 5}]}))
    assert [s.id for s in load_job_specs([path], SchedulerSettings(), "cron_queue")] == ["g"]


def test_the_default_size_limit_fits_10000_exported_json_jobs(tmp_path: Path) -> None:
    jobs = [
        spec_document(spec(id=f"customer-{i:05d}-report", cron=f"{i % 60} {i % 24} * * *", interval=None, args=[i]))
        for i in range(10_000)
    ]
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"jobs": jobs}, indent=1))
    assert path.stat().st_size < SchedulerSettings().job_file_max_bytes == MAX_FILE_BYTES
    assert len(parse_job_file(path)["jobs"]) == 10_000
    small = SchedulerSettings(job_file_max_bytes=1024)
    with pytest.raises(JobSpecError, match=r"larger than 1024 bytes \(SCHEDULER_JOB_FILE_MAX_BYTES\)"):
        load_job_specs([path], small, "cron_queue")
