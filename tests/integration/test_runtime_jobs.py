"""Jobs created, edited and deleted at runtime (#13), with real processes: two
``run_scheduler.py`` replicas, a worker and one redis-server. What ran is counted from what the
worker executed (``demo.record_fire``), and the schedule from the fire records.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scheduler.api import Client
from shared.errors import OwnershipError
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import RedisServer, SchedulerProcess, WorkerProcess, executions, make_settings, wait_for, write_jobs

pytestmark = pytest.mark.timeout(180)


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def fire_records(redis_client: Any, settings: AppSettings, job_id: str) -> list[dict[str, str]]:
    """The job's fire hashes, oldest first."""
    keys = RedisKeys(settings.redis.key_prefix)
    stamps = redis_client.lrange(keys.history(job_id), 0, -1)
    return [h for h in (redis_client.hgetall(keys.fire(job_id, s)) for s in reversed(stamps)) if h]


def runs_of(redis_client: Any, settings: AppSettings, job_id: str) -> list[str]:
    """scheduled_at of each execution of the job, in the order they ran."""
    return [e["scheduled_at"] for e in executions(redis_client, settings) if e["job_id"] == job_id]


@pytest.fixture
def fleet(
    settings: AppSettings,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
) -> list[SchedulerProcess]:
    """Two replicas (with one job file job, ``filejob``) and a threads worker."""
    start_worker(settings, "--pool", "threads", "--concurrency", "4")
    jobs = write_jobs(
        tmp_path / "jobs.yaml", [{"id": "filejob", "task": "demo.record_fire", "interval": 3600, "enabled": False}]
    )
    return start_scheduler(settings, jobs, count=2)


@pytest.fixture
def client(settings: AppSettings) -> Iterator[Client]:
    with Client(settings, by="test") as api:
        yield api


def logged(replica: SchedulerProcess, text: str) -> Callable[[], bool]:
    return lambda: text in replica.log()


def job(job_id: str, **options: Any) -> dict[str, Any]:
    return {"id": job_id, "task": "demo.record_fire", "overlap": "allow", "coalesce": False, **options}


def test_api_job_fires_on_grid_once_and_an_interval_edit_switches_the_grid(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    created = client.create(job("tick", interval=1))
    assert (created.version, created.source) == (1, "api")
    wait_for(lambda: len(runs_of(redis_client, settings, "tick")) >= 4, 20, "tick to run 4 times")
    edited = client.update("tick", {"interval": 0.7}, expected_version=1)
    edited_at = time.time()
    assert edited.version == 2
    for replica in fleet:  # every replica runs the new definition
        wait_for(logged(replica, "API job updated (version 2)"), 10, "both replicas to apply it")

    def new_grid_fires() -> list[str]:
        return [s for s in runs_of(redis_client, settings, "tick") if epoch(s) > edited_at + 1.0]

    wait_for(lambda: len(new_grid_fires()) >= 4, 20, "fires on the new grid")
    runs = runs_of(redis_client, settings, "tick")
    assert [s for s, n in Counter(runs).items() if n > 1] == [], "a fire ran twice"
    before = [epoch(s) for s in runs if epoch(s) <= edited_at]
    assert before and all(t == int(t) for t in before), "the 1 s grid is whole seconds"
    # Every fire due more than 1 s after the edit is on the 0.7 s grid (epoch-aligned).
    assert all(abs(round(epoch(s) / 0.7) * 0.7 - epoch(s)) < 1e-3 for s in new_grid_fires()), new_grid_fires()


def test_delete_stops_the_job_and_recreating_it_is_a_new_job(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create(job("gone", interval=1))
    client.create(job("witness", interval=1))
    wait_for(lambda: len(runs_of(redis_client, settings, "gone")) >= 2, 20, "gone to run")
    client.delete("gone", note="not needed")
    deleted_at = time.time()
    # The witness keeps firing: once it ran 3 fires due 1 s after the delete, "gone" had its chance.
    wait_for(
        lambda: len([s for s in runs_of(redis_client, settings, "witness") if epoch(s) > deleted_at + 1]) >= 3,
        20,
        "the witness to keep running",
    )
    assert [s for s in runs_of(redis_client, settings, "gone") if epoch(s) > deleted_at + 1] == []
    with pytest.raises(KeyError):
        client.get("gone")

    recreated = client.create(job("gone", interval=1))
    assert recreated.version == 1
    wait_for(
        lambda: any(epoch(s) > epoch(recreated.created_at or "") for s in runs_of(redis_client, settings, "gone")),
        20,
        "the re-created job to run",
    )
    gap = [
        s
        for s in runs_of(redis_client, settings, "gone")
        if deleted_at + 1 < epoch(s) <= epoch(recreated.created_at or "")
    ]
    assert gap == [], "the re-created job caught up the deleted one's schedule"
    audit = [json.loads(a) for a in redis_client.lrange(f"{settings.redis.key_prefix}audit", 0, -1)]
    creates = [a for a in audit if a["job"] == "gone" and a["action"] == "create"]
    assert "re-created" in creates[0]["note"]


def test_resume_after_three_missed_slots_runs_no_catch_up(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create(job("nap", interval=1))
    wait_for(lambda: len(runs_of(redis_client, settings, "nap")) >= 2, 20, "nap to run")
    client.pause("nap", note="maintenance")

    def skipped() -> list[str]:
        return [f["scheduled_at"] for f in fire_records(redis_client, settings, "nap") if f["outcome"] == "skipped"]

    wait_for(lambda: len(skipped()) >= 3, 20, "three slots to pass while paused")
    resumed = client.resume("nap")
    assert not resumed.paused
    resumed_at = time.time()
    wait_for(
        lambda: len([s for s in runs_of(redis_client, settings, "nap") if epoch(s) > resumed_at]) >= 2,
        20,
        "nap to run again",
    )
    ran = set(runs_of(redis_client, settings, "nap"))
    assert ran.isdisjoint(skipped()), "a slot missed while paused ran after all"
    dispatched = [f for f in fire_records(redis_client, settings, "nap") if f["outcome"] == "dispatched"]
    late = [f["scheduled_at"] for f in dispatched if int(f["dispatched_ms"]) / 1000 - epoch(f["scheduled_at"]) > 1.5]
    assert late == [], "a fire went out as a catch-up"


def test_backfill_dispatches_exactly_the_missing_past_slots(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create(job("late", interval=1, enabled=False))  # registered, never fires by itself
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    end = start + timedelta(seconds=9)
    first = client.backfill("late", start + timedelta(seconds=2), start + timedelta(seconds=4))
    assert len(first.dispatched) == 3
    wait_for(lambda: len(runs_of(redis_client, settings, "late")) == 3, 20, "the first 3 to run")
    result = client.backfill("late", start, end)
    assert len(result.dispatched) == 7
    assert sorted(result.already_decided) == sorted(first.dispatched)
    expected = {(start + timedelta(seconds=i)).isoformat() for i in range(10)}
    wait_for(lambda: len(runs_of(redis_client, settings, "late")) >= 10, 20, "all 10 to run")
    runs = runs_of(redis_client, settings, "late")
    assert sorted(runs) == sorted(expected), "exactly the 10 slots, each once"
    records = fire_records(redis_client, settings, "late")
    assert {f["trigger"] for f in records} == {"backfill"}
    again = client.backfill("late", start, end)
    assert (again.dispatched, len(again.already_decided)) == ([], 10)


def test_sequential_backfill_runs_one_after_another_in_nominal_order(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create(job("seq", interval=1, enabled=False, kwargs={"seconds": 0.5}))
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    result = client.backfill("seq", start, start + timedelta(seconds=3), overlap="sequential")
    assert (len(result.dispatched), len(result.queued)) == (1, 3)
    wait_for(lambda: len(runs_of(redis_client, settings, "seq")) == 4, 30, "the 4 fires to run")
    runs = [e for e in executions(redis_client, settings) if e["job_id"] == "seq"]
    assert [e["scheduled_at"] for e in runs] == [(start + timedelta(seconds=i)).isoformat() for i in range(4)]
    starts = [e["started_ms"] for e in runs]
    assert all(b - a >= 500 for a, b in itertools.pairwise(starts)), "one started before the previous ended"


def test_pause_after_two_failures_pauses_the_job_fleet_wide(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create(
        {"id": "broken", "task": "demo.number_sum", "args": ["not a number"], "interval": 1, "pause_after_failures": 2}
    )
    paused = wait_for(lambda: client.get("broken").paused and client.get("broken"), 30, "broken to pause itself")
    assert "2 consecutive failures" in paused.paused_note
    assert "TypeError" in paused.paused_note and "fire 20" in paused.paused_note
    failed = [f for f in fire_records(redis_client, settings, "broken") if f.get("run") == "failed"]
    assert len(failed) == 2
    assert failed[-1]["scheduled_at"] in paused.paused_note
    # Paused: its later fires are skipped on both replicas, none runs.
    wait_for(
        lambda: sum(f["outcome"] == "skipped" for f in fire_records(redis_client, settings, "broken")) >= 2,
        20,
        "skipped fires",
    )
    assert len([f for f in fire_records(redis_client, settings, "broken") if f.get("run") == "failed"]) == 2


def test_file_jobs_are_owned_by_their_file_and_a_reload_keeps_api_jobs(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client, tmp_path: Path
) -> None:
    wait_for(lambda: client.list(source="file").total == 1, 10, "the replicas to publish their file job")
    with pytest.raises(OwnershipError, match=r"belongs to job file .*jobs.yaml"):
        client.update("filejob", {"args": [1]})
    with pytest.raises(OwnershipError, match=r"belongs to job file .*jobs.yaml"):
        client.delete("filejob")
    with pytest.raises(OwnershipError, match=r"job file .*jobs.yaml"):
        client.create(job("filejob", interval=5))
    assert client.pause("filejob", note="allowed").paused
    assert not client.resume("filejob").paused
    client.create(job("api-only", interval=3600))
    # A job file that now also uses the API job's id: the file's job is refused, naming both.
    write_jobs(tmp_path / "jobs.yaml", [{"id": "api-only", "task": "demo.sleep", "interval": 60}])
    import signal

    for replica in fleet:
        replica.signal(signal.SIGHUP)
    for replica in fleet:
        wait_for(logged(replica, "reloaded job files"), 20, "the reload")
        assert "id is already used by an API job" in replica.log()
    record = client.get("api-only")
    assert (record.source, record.spec["task"]) == ("api", "demo.record_fire")
    assert client.list(source="api").total == 1


def test_an_edit_that_keeps_the_trigger_keeps_the_grid_and_the_next_fire_carries_it(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create({"id": "sum", "task": "demo.number_sum", "args": [1], "interval": 1, "coalesce": False})
    wait_for(lambda: len(fire_records(redis_client, settings, "sum")) >= 2, 20, "sum to fire")
    client.update("sum", {"args": [41]})
    edited_at = time.time()

    def after_edit() -> list[dict[str, str]]:
        return [f for f in fire_records(redis_client, settings, "sum") if epoch(f["scheduled_at"]) > edited_at + 1]

    wait_for(lambda: len(after_edit()) >= 3, 20, "fires after the edit")
    stamps = [epoch(f["scheduled_at"]) for f in fire_records(redis_client, settings, "sum")]
    assert all(t == int(t) for t in stamps), "the grid moved"
    assert len(stamps) == len(set(stamps))
    results = [client.result(f["task_id"], timeout=20) for f in after_edit()[:3]]
    assert results == [41, 41, 41], "a fire after the edit carried the old args"


def test_an_invalid_stored_job_is_reported_and_not_run_and_others_run_on(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    from tests.conftest import chronoq

    redis_client = redis_server.client()
    keys = RedisKeys(settings.redis.key_prefix)
    client.create(job("fine", interval=1))
    # Hand-written into Redis, past the API's validation (61 is no minute).
    bad = {"id": "bad", "source": "api", "spec": {"id": "bad", "task": "demo.record_fire", "cron": "61 * * * *"}}
    redis_client.hset(keys.api_jobs, "bad", json.dumps({"version": 1, **bad}))
    redis_client.xadd(keys.changes, {"op": "update", "job": "bad", "version": "1"})
    for replica in fleet:
        wait_for(logged(replica, "stored API job refused, not run"), 10, "each replica to refuse it")
        assert "cron '61 * * * *': minute must be 0-59" in replica.log()
    status = chronoq(settings, "status", check=False).stdout
    assert "INVALID     API job bad (version 1) not run: " in status
    started = time.time()
    wait_for(
        lambda: len([s for s in runs_of(redis_client, settings, "fine") if epoch(s) > started]) >= 2,
        20,
        "the valid job to run on",
    )
    assert runs_of(redis_client, settings, "bad") == []
    # Fixed through the API: valid again, reported no more.
    client.update("bad", {"cron": "* * * * *"})
    wait_for(lambda: not redis_client.hexists(keys.invalid_jobs, "bad"), 10, "the report to clear")


def test_a_replica_that_fell_behind_the_trimmed_feed_resyncs(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
    client: Client,
) -> None:
    import signal

    redis_client = redis_server.client()
    start_worker(settings, "--pool", "threads", "--concurrency", "4")
    jobs = write_jobs(tmp_path / "jobs.yaml", [])
    client.create(job("doomed", interval=1))
    client.create(job("busy", interval=3600))
    (replica,) = start_scheduler(settings, jobs)
    wait_for(lambda: len(runs_of(redis_client, settings, "doomed")) >= 1, 20, "doomed to run")
    replica.signal(signal.SIGSTOP)
    short_feed = make_settings(
        settings.redis.connection_url(), settings.redis.key_prefix[1:-1], scheduler={"changes_maxlen": 100}
    )
    try:
        with Client(short_feed) as writer:  # the writer trims the feed (XADD MAXLEN ~ 100)
            for n in range(400):  # the entries this replica has not read are trimmed away
                writer.update("busy", {"args": [n]})
            writer.delete("doomed")
            writer.create(job("newcomer", interval=1))
    finally:
        replica.signal(signal.SIGCONT)
    wait_for(lambda: "change feed trimmed past" in replica.log(), 15, "the replica to notice the gap")
    wait_for(lambda: "API jobs resynced" in replica.log(), 15, "the resync")
    resumed = time.time()
    wait_for(
        lambda: len([s for s in runs_of(redis_client, settings, "newcomer") if epoch(s) > resumed]) >= 2,
        20,
        "the job created during the gap to run",
    )
    assert [s for s in runs_of(redis_client, settings, "doomed") if epoch(s) > resumed] == []


def test_after_redis_lost_its_data_the_replicas_stop_running_the_lost_api_jobs(
    settings: AppSettings, redis_server: RedisServer, fleet: list[SchedulerProcess], client: Client
) -> None:
    redis_client = redis_server.client()
    client.create(job("lost", interval=1))
    wait_for(lambda: len(runs_of(redis_client, settings, "lost")) >= 2, 20, "lost to run")
    for key in redis_client.scan_iter(f"{settings.redis.key_prefix}*"):  # what a restart without persistence leaves
        redis_client.delete(key)
    lost_at = time.time()
    for replica in fleet:
        wait_for(logged(replica, "API jobs resynced: 0 stored"), 15, "each replica to resync")
    # The file job is back in the registry (the replicas rewrite what they own); the API job is gone.
    wait_for(lambda: client.list(source="file").total == 1, 10, "the registry rewritten")
    assert client.list(source="api").total == 0
    created = client.create(job("witness", interval=1))
    wait_for(lambda: len(runs_of(redis_client, settings, "witness")) >= 3, 20, "a new API job to run")
    late = [s for s in runs_of(redis_client, settings, "lost") if epoch(s) > lost_at + 1]
    assert late == [], "a replica kept running the API job Redis lost"
    assert created.version == 1
