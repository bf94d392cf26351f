"""The job list's snapshot (scheduler.joblist.JobIndex) against a real redis-server: it is read
once and kept while nothing changes, and every kind of write to the job definitions makes the
next list read it again: an API job written by its script, a replica publishing its jobs, a
removal, a write that only an older replica would make (seen after ``max_age_s``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from scheduler.control import ControlStore
from scheduler.joblist import JobIndex
from scheduler.jobops import JobOps
from scheduler.operator import Operator
from scheduler.specs import JobSpec
from shared.names import RedisKeys
from shared.redis import create_async_redis
from shared.settings import AppSettings

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ops(settings: AppSettings) -> AsyncIterator[tuple[JobOps, JobIndex, Clock]]:
    client = create_async_redis(settings.redis)
    clock = Clock()
    index = JobIndex(max_age_s=30, outcome_ttl_s=5, clock=clock)
    try:
        yield JobOps(Operator(settings, client, by="test"), index=index), index, clock
    finally:
        await client.aclose()


def spec(job_id: str, task: str = "demo.sleep", source: str = "/etc/chronoq/jobs.yaml") -> JobSpec:
    return JobSpec.model_validate({"id": job_id, "task": task, "cron": "0 3 * * *", "source": source})


async def test_the_snapshot_is_reread_exactly_when_the_job_definitions_moved(
    ops: tuple[JobOps, JobIndex, Clock],
) -> None:
    jobs, index, clock = ops
    control = ControlStore(jobs.client, jobs.keys)
    await control.publish_jobs([spec("file-a"), spec("file-b")], {})
    assert [r.id for r in (await jobs.list()).items] == ["file-a", "file-b"]
    for _ in range(5):
        assert (await jobs.list(query="file-b")).total == 1
    await jobs.pause("file-a", "paused flags are read by every list, not kept")
    assert [r.id for r in (await jobs.list(paused=True)).items] == ["file-a"]
    assert index.loads == 1

    await jobs.create({"id": "api-1", "task": "demo.number_sum", "cron": "0 4 * * *"})
    assert (await jobs.list(source="api")).total == 1 and index.loads == 2
    await jobs.update("api-1", {"task": "demo.record_fire"})
    assert [r.id for r in (await jobs.list(query="record_fire")).items] == ["api-1"] and index.loads == 3
    await control.publish_jobs([spec("file-a", task="demo.number_sum"), spec("file-b")], {})
    assert [r.id for r in (await jobs.list(query="number_sum")).items] == ["file-a"] and index.loads == 4
    await control.remove("file-b", "hash", "/etc/chronoq/jobs.yaml")
    assert [r.id for r in (await jobs.list(source="file")).items] == ["file-a"] and index.loads == 5
    await jobs.delete("api-1")
    assert (await jobs.list()).total == 1 and index.loads == 6

    # A writer that moves no counter (an older replica): seen once the snapshot is max_age_s old.
    entry = json.dumps(
        {"spec": json.loads(spec("file-a", task="demo.async_sleep").model_dump_json(by_alias=True)), "source_hash": ""}
    )
    await jobs.client.hset(RedisKeys(jobs.keys.prefix).jobs, "file-a", entry)
    assert (await jobs.list(query="async_sleep")).total == 0
    clock.now += 30
    assert (await jobs.list(query="async_sleep")).total == 1 and index.loads == 7


async def test_last_outcomes_are_kept_for_their_ttl(ops: tuple[JobOps, JobIndex, Clock]) -> None:
    jobs, _, clock = ops
    await ControlStore(jobs.client, jobs.keys).publish_jobs([spec("a"), spec("b")], {})
    assert [r.id for r in (await jobs.list(outcome="never")).items] == ["a", "b"]
    await jobs.client.lpush(jobs.keys.history("a"), "2026-12-01T00:00:00Z")
    await jobs.client.hset(
        jobs.keys.fire("a", "2026-12-01T00:00:00Z"), mapping={"outcome": "dispatched", "run": "failed"}
    )
    assert (await jobs.list(outcome="failed")).total == 0, "within the TTL the outcomes read before are used"
    clock.now += 5
    assert [r.id for r in (await jobs.list(outcome="failed")).items] == ["a"]
    assert [r.id for r in (await jobs.list(outcome="never")).items] == ["b"]
