"""The files the scheduler shares with its metrics server: what the writer puts there is what
the reader gets back, the job list is rewritten only when it changed, and a fire time that
moved is seen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from scheduler.replicastate import BEAT, DONE, WANTED, JobRow, StateReader, StateWriter

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def job(job_id: str, queue: str = "cron") -> SimpleNamespace:
    return SimpleNamespace(id=job_id, queue=queue)


def row(spec: SimpleNamespace) -> list[str]:
    return [spec.id, "demo.sleep", "cron", "0 3 * * *", "UTC", spec.queue, "skip", "jobs.yaml"]


def test_job_rows_and_next_fires_round_trip(tmp_path: Path) -> None:
    writer, jobs = StateWriter(tmp_path), [job("a"), job("b", "other")]
    reader = StateReader(tmp_path)
    reader.load()
    assert reader.gen == -1 and reader.rows == []  # nothing written yet
    target = reader.request()
    assert writer.wanted()
    writer.write_jobs(jobs, row, {"a": T0, "b": None}, lambda js: {"cron": ["cron"]}, now_mono=5.0)
    assert not writer.wanted() and writer.block.get(DONE) == target == reader.block.get(WANTED)
    reader.load()
    assert reader.rows == [JobRow(*row(jobs[0])), JobRow(*row(jobs[1]))]
    assert reader.next_fires == {"a": T0.timestamp(), "b": None}
    assert reader.queue_keys == {"cron": ["cron"]}
    writer.block.set(BEAT, 12.5)
    assert reader.block.get(BEAT) == 12.5


def test_the_job_list_is_written_again_only_when_it_changed(tmp_path: Path) -> None:
    writer, reader = StateWriter(tmp_path), StateReader(tmp_path)
    jobs = [job("a"), job("b")]
    made: list[str] = []

    def counted(spec: SimpleNamespace) -> list[str]:
        made.append(spec.id)
        return row(spec)

    writer.write_jobs(jobs, counted, {"a": T0, "b": T0}, lambda js: {}, 1.0)
    writer.write_jobs(list(jobs), counted, {"a": T0 + timedelta(seconds=10), "b": T0}, lambda js: {}, 2.0)
    assert writer.gen == 1 and made == ["a", "b"], "same specs: no new jobs.json, no new rows"
    reader.load()
    assert reader.next_fires["a"] == T0.timestamp() + 10, "a moved fire is seen"
    jobs = [jobs[0], job("c")]  # b deleted, c created
    writer.write_jobs(jobs, counted, {"a": T0, "c": None}, lambda js: {}, 3.0)
    assert writer.gen == 2 and made == ["a", "b", "c"]
    reader.load()
    assert [r.id for r in reader.rows] == ["a", "c"] and reader.next_fires == {"a": T0.timestamp(), "c": None}
