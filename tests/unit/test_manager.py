"""SchedulerManager on a real AsyncIOScheduler with a recording sink (no Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import pytest

from scheduler.manager import SchedulerManager, UnknownJobError
from scheduler.specs import JobDefaults, JobSpec
from shared.errors import ChronoqError
from shared.settings import SchedulerSettings

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self) -> None:
        self.fired: list[tuple[str, datetime]] = []
        self.skipped: list[tuple[str, datetime]] = []
        self.missed: list[tuple[str, datetime]] = []

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None:
        self.fired += [(job.id, t) for t in run_times]

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None:
        self.missed += [(job.id, t) for t in times]

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None:
        self.skipped += [(job.id, t) for t in run_times]


def defaults(**overrides: object) -> JobDefaults:
    settings = SchedulerSettings(**overrides)  # type: ignore[arg-type]
    return JobDefaults.from_settings(settings, "cron_queue")


async def wait_until(predicate: object, timeout_s: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_pending_jobs_are_added_in_order_at_start_and_fire() -> None:
    sink = Recorder()
    manager = SchedulerManager(defaults(jitter=1.5, max_instances=3), sink)
    first = manager.register_interval("first", "demo.sleep", 0.2, args=[0])
    manager.register_cron("second", "demo.sleep", {"second": "*"}, max_instances=1)
    with pytest.raises(ChronoqError, match="already registered"):
        manager.register_interval("first", "demo.sleep", 1)
    assert not manager.running
    assert [s.id for s in manager.list()] == ["first", "second"]
    # Defaults apply unless the job overrides them.
    assert (first.jitter, first.max_instances) == (1.5, 3)
    assert manager.get("second").max_instances == 1
    async with manager:
        assert [job.id for job in manager.scheduler.get_jobs()] == ["first", "second"]
        await wait_until(lambda: {"first", "second"} <= {job for job, _ in sink.fired})


async def test_pause_resume_modify_reschedule_remove() -> None:
    sink = Recorder()
    async with SchedulerManager(defaults(), sink) as manager:
        manager.register_interval("tick", "demo.sleep", 0.1, args=[0])
        await wait_until(lambda: sink.fired)
        manager.pause("tick")
        await wait_until(lambda: len(sink.skipped) >= 2)  # fires keep coming due, recorded as skipped
        fired, skipped = len(sink.fired), len(sink.skipped)
        await wait_until(lambda: len(sink.skipped) >= skipped + 2)  # two more came due while paused
        assert len(sink.fired) == fired
        manager.resume("tick")
        await wait_until(lambda: len(sink.fired) > fired)

        changed = manager.modify("tick", args=[5], priority=3)
        assert (changed.args, changed.priority, changed.interval_s) == ([5], 3, 0.1)
        moved = manager.reschedule("tick", cron="0 3 * * *")
        assert (moved.kind, moved.cron, moved.args) == ("cron", "0 3 * * *", [5])
        next_fire = manager.next_fire_time("tick")
        assert next_fire is not None
        assert (next_fire.hour, next_fire.minute) == (3, 0)

        manager.remove("tick")
        with pytest.raises(UnknownJobError):
            manager.get("tick")
        assert manager.scheduler.get_job("tick") is None


async def test_disabled_job_is_listed_but_never_fires() -> None:
    sink = Recorder()
    async with SchedulerManager(defaults(), sink) as manager:
        manager.register_interval("off", "demo.sleep", 0.05, enabled=False)
        await asyncio.sleep(0.3)
        assert [s.id for s in manager.list()] == ["off"]
        assert manager.next_fire_time("off") is None
        assert sink.fired == []
