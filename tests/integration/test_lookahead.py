"""Look-ahead against a real redis-server: fires prepared ahead of time are never published
before their nominal time plus jitter, and a shutdown with fires handed over ahead loses none of
them (the restart's catch-up publishes them) and publishes none early."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scheduler.planner import jitter_of
from scheduler.service import SchedulerService, ServiceOptions, load_specs
from shared.settings import AppSettings
from tests.conftest import RedisServer, make_settings, queued_fires, write_jobs

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def service(settings: AppSettings, path: Path, jobs: list[dict[str, Any]]) -> AsyncIterator[SchedulerService]:
    write_jobs(path, jobs, {"overlap": "allow"})
    options = ServiceOptions(job_files=[path], local_worker=False)
    async with SchedulerService(settings, options, load_specs(settings, options)) as running:
        yield running


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_no_fire_is_published_before_its_time_plus_jitter(
    namespace: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, namespace, scheduler={"lookahead_s": 1.5})
    client = redis_server.client()
    queue = settings.celery.cron_queue
    jobs: list[dict[str, Any]] = [
        {"id": "plain", "task": "demo.sleep", "interval": 0.3, "args": [0], "coalesce": False},
        {"id": "jittery", "task": "demo.sleep", "interval": 0.3, "jitter": 0.25, "args": [0], "coalesce": False},
        {"id": "minute", "task": "demo.sleep", "cron": {"second": "*"}, "args": [0]},
    ]
    async with service(settings, tmp_path / "jobs.yaml", jobs) as running:
        await wait_until(lambda: len(queued_fires(client, queue)) >= 30, 30, "30 fires")
        histories = {job["id"]: await running.state.history(str(job["id"])) for job in jobs}
        specs = {spec.id: spec for spec in running.manager.list()}
    checked = 0
    for job_id, history in histories.items():
        for fire in history:
            if fire["outcome"] != "dispatched":
                continue
            nominal = datetime.fromisoformat(fire["scheduled_at"])
            release_ms = (nominal.timestamp() + jitter_of(specs[job_id], nominal)) * 1000
            # dispatched_ms is Redis's clock (this host's) at the LPUSH, truncated to the ms.
            assert fire["dispatched_ms"] >= int(release_ms), f"{job_id} {fire['scheduled_at']} published early"
            checked += 1
    assert checked >= 20
    assert {f["job_id"] for f in queued_fires(client, queue)} == {"plain", "jittery", "minute"}


async def test_shutdown_drops_fires_not_yet_due_and_the_restart_catches_them_up(
    namespace: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    # A long look-ahead, so that several fires are handed over (and prepared) ahead when it stops.
    settings = make_settings(redis_server.url, namespace, scheduler={"lookahead_s": 5})
    client = redis_server.client()
    queue = settings.celery.cron_queue
    job = {"id": "tick", "task": "demo.sleep", "interval": 0.5, "args": [0], "coalesce": False}
    path = tmp_path / "jobs.yaml"
    async with service(settings, path, [job]) as running:
        await wait_until(lambda: len(queued_fires(client, queue)) >= 3, 10, "three fires")
        assert running.dispatcher.timeline  # fires handed over ahead and waiting for their time
    stopped_at = time.time()
    first_run = [datetime.fromisoformat(f["scheduled_at"]) for f in queued_fires(client, queue)]
    # Nothing was published ahead of its time by the shutdown's drain.
    assert all(at.timestamp() <= stopped_at for at in first_run)
    await asyncio.sleep(1.2)  # down for two fires or so
    async with service(settings, path, [job]):
        await wait_until(
            lambda: (
                datetime.fromisoformat(queued_fires(client, queue)[-1]["scheduled_at"]).timestamp() > time.time() - 0.2
            ),
            10,
            "the restarted scheduler to catch up to now",
        )
    fires = [datetime.fromisoformat(f["scheduled_at"]) for f in queued_fires(client, queue)]
    assert len(fires) == len(set(fires)), "a fire was published twice"
    # The grid is whole: the fires dropped at shutdown and those due while down were caught up.
    expected = [fires[0] + timedelta(seconds=0.5 * i) for i in range(len(fires))]
    assert sorted(fires) == expected
    assert any(at.timestamp() > stopped_at for at in fires)
