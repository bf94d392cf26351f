"""The scheduler service in-process against a real redis-server (and real workers where a task
must run): dispatch, defaults, jitter, restart catch-up, reload, bursts."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from scheduler.planner import jitter_of
from scheduler.service import SchedulerService, ServiceOptions, load_specs
from scheduler.specs import JobSpec
from shared.celery_app import create_celery_app
from shared.settings import AppSettings
from tests.conftest import RedisServer, WorkerProcess, make_settings, queued_fires, write_jobs

pytestmark = pytest.mark.timeout(120)

ServiceFactory = Callable[..., Any]


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    return tmp_path / "jobs.yaml"


@pytest.fixture
def run_service(settings: AppSettings, jobs_file: Path) -> ServiceFactory:
    """``async with run_service(jobs) as service`` runs a SchedulerService on ``jobs``."""

    @asynccontextmanager
    async def run(
        jobs: list[dict[str, Any]] | None = None,
        settings_: AppSettings | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> AsyncIterator[SchedulerService]:
        if jobs is not None:
            # Nothing consumes most of these queues: without "allow", max_instances (1 queued
            # or running, fleet-wide) would skip every fire after the first.
            write_jobs(jobs_file, jobs, {"overlap": "allow", **(defaults or {})})
        effective = settings_ or settings
        options = ServiceOptions(job_files=[jobs_file], local_worker=False)
        async with SchedulerService(effective, options, load_specs(effective, options)) as service:
            yield service

    return run


async def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def fires_of(client: redis.Redis, queue: str, job_id: str) -> list[str]:
    return [h["scheduled_at"] for h in queued_fires(client, queue) if h.get("job_id") == job_id]


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


async def test_interval_job_runs_on_cron_queue_worker_only(
    settings: AppSettings, run_service: ServiceFactory, start_worker: Callable[..., WorkerProcess]
) -> None:
    cron = start_worker(settings, "-Q", settings.celery.cron_queue, "-P", "threads", "-c", "2", name="cron")
    start_worker(settings, "-Q", settings.celery.default_queue, "-P", "threads", "-c", "2", name="adhoc")
    async with run_service([{"id": "tick", "task": "demo.number_sum", "interval": 1, "args": [40, 2]}]) as service:
        history = await wait_until(lambda: _dispatched(service, "tick", 3), 10, "three dispatched fires")
    app = create_celery_app(settings)
    try:
        for record in history:
            result = AsyncResult(record["task_id"], app=app)
            assert result.get(timeout=10) == 42
            assert result.worker == cron.hostname
            assert result.queue == settings.celery.cron_queue
    finally:
        app.close()


async def _dispatched(service: SchedulerService, job_id: str, count: int) -> list[dict[str, Any]] | None:
    history = [h for h in await service.state.history(job_id) if h["outcome"] == "dispatched"]
    return history if len(history) >= count else None


async def test_message_carries_headers_defaults_and_overrides(
    settings: AppSettings, run_service: ServiceFactory, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    jobs = [
        {"id": "plain", "task": "demo.number_sum", "interval": 1},
        {
            "id": "custom",
            "task": "demo.number_sum",
            "interval": 1,
            "priority": 0,
            "expires": 30,
            "misfire_grace_time": 5,
            "coalesce": False,
            "max_instances": 3,
            "queue": "special_q",
            "kwargs": {"y": 1},
        },
    ]
    async with run_service(jobs, defaults={"misfire_grace_time": 120, "jitter": 0}) as service:
        plain, custom = service.manager.get("plain"), service.manager.get("custom")
        assert (plain.misfire_grace_time, plain.coalesce, plain.max_instances) == (120, True, 1)
        assert plain.queue == settings.celery.cron_queue
        assert (custom.misfire_grace_time, custom.coalesce, custom.max_instances) == (5, False, 3)
        await wait_until(
            lambda: fires_of(client, settings.celery.cron_queue, "plain") and fires_of(client, "special_q", "custom"),
            10,
            "a fire of each job",
        )
    plain_msg = next(h for h in queued_fires(client, settings.celery.cron_queue) if h["job_id"] == "plain")
    custom_msg = next(h for h in queued_fires(client, "special_q") if h["job_id"] == "custom")
    for message, job_id in ((plain_msg, "plain"), (custom_msg, "custom")):
        from shared.names import fire_task_id

        assert message["task"] == "demo.number_sum"
        assert message["id"] == fire_task_id(job_id, parse(message["scheduled_at"]))
        assert parse(message["scheduled_at"]).utcoffset() == timedelta(0)
    # expires: the job's own value (30 s), else its grace (120 s), from the nominal fire time.
    for message, seconds in ((plain_msg, 120), (custom_msg, 30)):
        delta = (parse(message["expires"]) - parse(message["scheduled_at"])).total_seconds()
        assert seconds - 1 <= delta <= seconds + 1


async def test_jitter_stays_in_bounds_and_grid_does_not_drift(
    settings: AppSettings, run_service: ServiceFactory, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    queue = settings.celery.cron_queue
    arrivals: dict[tuple[str, str], float] = {}

    def poll() -> bool:
        now = time.time()
        for headers in queued_fires(client, queue):
            arrivals.setdefault((headers["job_id"], headers["scheduled_at"]), now)
        return min(Counter(job_id for job_id, _ in arrivals).get(j, 0) for j in ("jittery", "steady")) >= 50

    # coalesce off: on a loaded machine two fires can come due at once, and both must run. The
    # twin without jitter, on the same grid in the same process, measures the dispatch latency
    # of the moment, so the jittered job's delay is judged against it, not against a wall-clock
    # figure that a loaded machine can exceed.
    common: dict[str, Any] = {"task": "demo.sleep", "interval": 0.2, "args": [0], "coalesce": False}
    jittery: dict[str, Any] = {"id": "jittery", "jitter": 0.15, **common}
    async with run_service([jittery, {"id": "steady", **common}]):
        deadline = time.monotonic() + 30
        while not poll():
            assert time.monotonic() < deadline, "50 fires of each job did not arrive in time"
            await asyncio.sleep(0.01)

    def fires_of(job_id: str) -> dict[datetime, float]:
        fires = sorted((parse(s), at) for (j, s), at in arrivals.items() if j == job_id)
        return dict(fires[:50])

    jittered, steady = fires_of("jittery"), fires_of("steady")
    for fires in (jittered, steady):
        nominal = list(fires)
        # On the nominal grid: consecutive fires exactly 0.2 s apart, aligned to the epoch.
        assert {round((b - a).total_seconds(), 6) for a, b in itertools.pairwise(nominal)} == {0.2}
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        assert all((t - epoch) // timedelta(microseconds=1) % 200_000 == 0 for t in nominal)
    # Each fire's delay is the planner's, pseudo-random per fire in 0..0.15 s, and no fire is
    # published before its nominal time plus that delay.
    spec = JobSpec(**jittery)
    delays = {at: jitter_of(spec, at) for at in jittered}
    assert all(0 <= d < 0.15 for d in delays.values())
    assert len({round(d, 2) for d in delays.values()}) > 5, "not random: a constant delay"
    early = {at.isoformat(): round(arrival - at.timestamp() - delays[at], 3) for at, arrival in jittered.items()}
    assert all(lateness >= -0.001 for lateness in early.values()), f"published before its jitter: {early}"
    assert all(arrival >= at.timestamp() for at, arrival in steady.items())
    # And no later than that delay: past it, the jittered fires are as late as the twin's.
    excess = statistics.median(arrival - at.timestamp() - delays[at] for at, arrival in jittered.items())
    baseline = statistics.median(arrival - at.timestamp() for at, arrival in steady.items())
    assert excess <= baseline + 0.05, f"median lateness past the jitter {excess:.3f}s, twin's {baseline:.3f}s"


@pytest.mark.parametrize("coalesce", [True, False])
async def test_restart_catch_up(
    settings: AppSettings, run_service: ServiceFactory, redis_server: RedisServer, coalesce: bool
) -> None:
    client = redis_server.client()
    queue = settings.celery.cron_queue
    job = {
        "id": "every-second",
        "task": "demo.sleep",
        "interval": 1,
        "args": [0],
        "coalesce": coalesce,
        "misfire_grace_time": 30,
    }
    async with run_service([job]):
        await wait_until(lambda: fires_of(client, queue, "every-second"), 5, "a first fire")
    first_run = fires_of(client, queue, "every-second")
    await asyncio.sleep(3.5)  # the scheduler is down for three or four fires
    async with run_service([job]) as service:
        await wait_until(lambda: len(fires_of(client, queue, "every-second")) > len(first_run), 5, "a catch-up fire")
        await asyncio.sleep(0.3)
        counters = await service.state.counters("every-second")
    fires = [parse(s) for s in fires_of(client, queue, "every-second")]
    assert len(fires) == len(set(fires)), "a fire was published twice"
    last_before = parse(first_run[-1])
    caught_up = [f for f in fires if last_before < f <= last_before + timedelta(seconds=4.5)]
    if coalesce:
        # One catch-up dispatch for the whole gap; the others are counted as coalesced.
        assert counters.get("coalesced", 0) >= 2
        assert len([f for f in caught_up if f < fires[-1]]) <= 2
    else:
        # Every missed fire is dispatched, on the grid, with no gap.
        expected = [last_before + timedelta(seconds=i) for i in range(1, 4)]
        assert all(e in fires for e in expected), (expected, fires)
        assert counters.get("coalesced", 0) == 0


async def test_restart_records_fires_past_grace_as_missed(
    settings: AppSettings, run_service: ServiceFactory, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    queue = settings.celery.cron_queue
    job = {"id": "strict", "task": "demo.sleep", "interval": 1, "args": [0], "coalesce": False, "misfire_grace_time": 1}
    async with run_service([job]):
        await wait_until(lambda: fires_of(client, queue, "strict"), 5, "a first fire")
    await asyncio.sleep(4)
    async with run_service([job]) as service:

        async def missed_two() -> dict[str, int] | None:
            counters = await service.state.counters("strict")
            return counters if counters.get("missed", 0) >= 2 else None

        await wait_until(missed_two, 5, "two fires recorded missed")
        history = await service.state.history("strict")
    missed = [h for h in history if h["outcome"] == "missed"]
    assert all("past its misfire grace" in h["reason"] for h in missed)
    fires = fires_of(client, queue, "strict")
    assert len(fires) == len(set(fires))
    assert not set(fires) & {h["scheduled_at"] for h in missed}


async def test_date_job_fires_once_even_across_restart(
    settings: AppSettings, run_service: ServiceFactory, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    queue = settings.celery.cron_queue
    when = (datetime.now(UTC) + timedelta(seconds=1.5)).replace(microsecond=0)
    job = {"id": "launch", "task": "demo.sleep", "date": when.isoformat(), "args": [0]}
    async with run_service([job]):
        await wait_until(lambda: fires_of(client, queue, "launch"), 5, "the date job to fire")
    async with run_service([job]) as service:
        assert service.manager.next_fire_time("launch") is None
        await asyncio.sleep(1.5)
    assert fires_of(client, queue, "launch") == [when.isoformat()]


async def test_job_registered_before_start_runs_after_start(
    settings: AppSettings, run_service: ServiceFactory, redis_server: RedisServer
) -> None:
    # The service registers every file job on a manager that has not started yet.
    client = redis_server.client()
    async with run_service([{"id": "early", "task": "demo.sleep", "interval": 0.5, "args": [0]}]) as service:
        assert service.manager.running
        await wait_until(lambda: fires_of(client, settings.celery.cron_queue, "early"), 5, "the job to fire")


async def test_reload_adds_changes_removes_and_keeps_unchanged(
    settings: AppSettings, run_service: ServiceFactory, jobs_file: Path
) -> None:
    keep = {"id": "keep", "task": "demo.sleep", "cron": "*/5 * * * *", "args": [0]}
    change = {"id": "change", "task": "demo.sleep", "cron": "0 * * * *", "args": [0]}
    drop = {"id": "drop", "task": "demo.sleep", "interval": 3600}
    async with run_service([keep, change, drop]) as service:
        manager = service.manager
        keep_next = manager.next_fire_time("keep")
        keep_job = manager.scheduler.get_job("keep")
        write_jobs(
            jobs_file,
            [keep, {**change, "cron": "30 * * * *"}, {"id": "new", "task": "demo.sleep", "interval": 60}],
            {"overlap": "allow"},
        )
        assert await service.reload()
        assert sorted(spec.id for spec in manager.list()) == ["change", "keep", "new"]
        assert manager.get("change").cron == "30 * * * *"
        assert manager.next_fire_time("change").minute == 30  # type: ignore[union-attr]
        assert manager.scheduler.get_job("keep") is keep_job
        assert manager.next_fire_time("keep") == keep_next
        assert manager.scheduler.get_job("drop") is None
        # An invalid file is rejected and the running set stays exactly as it was.
        jobs_file.write_text("jobs:\n  - id: broken\n    task: demo.sleep\n    cron: '61 * * * *'\n")
        assert not await service.reload()
        assert sorted(spec.id for spec in manager.list()) == ["change", "keep", "new"]
        leaving = time.monotonic()
    # Shutdown is bounded even after the background loops talked to Redis: redis-py can swallow
    # a cancellation inside a command (regression: this exit used to hang forever).
    assert time.monotonic() - leaving < 3


async def test_burst_of_10000_fires_is_published_completely(
    namespace: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, namespace, log={"level": "WARNING"})
    client = redis_server.client()
    when = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    specs = [
        JobSpec(id=f"burst-{i}", task="demo.sleep", date=when, args=[0], queue=settings.celery.cron_queue)
        for i in range(10_000)
    ]
    options = ServiceOptions(job_files=[], local_worker=False)
    async with SchedulerService(settings, options, specs) as service:
        await wait_until(lambda: client.llen(settings.celery.cron_queue) >= 10_000, 30, "10,000 messages")
        await wait_until(lambda: service.dispatcher.outcomes["dispatched"] == 10_000, 10, "10,000 dispatched outcomes")
        counters = await service.state.counters()
    fires = queued_fires(client, settings.celery.cron_queue)
    assert len(fires) == 10_000
    assert len({f["job_id"] for f in fires}) == 10_000
    assert {f["scheduled_at"] for f in fires} == {when.isoformat()}
    assert counters == {"dispatched": 10_000}
