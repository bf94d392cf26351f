"""The ``chronoq`` operator commands against real scheduler replicas and a real worker."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from shared.settings import AppSettings
from tests.conftest import (
    RedisServer,
    SchedulerProcess,
    WorkerProcess,
    chronoq,
    executions,
    wait_for,
    write_jobs,
)
from tests.integration.test_replicas import fires

pytestmark = pytest.mark.timeout(150)

YEARLY = "0 0 1 1 *"


def ran(client: Any, settings: AppSettings, job_id: str) -> list[dict[str, Any]]:
    return [e for e in executions(client, settings) if e["job_id"] == job_id]


def as_json(settings: AppSettings, *args: str, check: bool = True) -> Any:
    return json.loads(chronoq(settings, *args, "--json", check=check).stdout)


def epoch(scheduled_at: str) -> float:
    return datetime.fromisoformat(scheduled_at).timestamp()


def test_pause_resume_trigger_and_status(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client = redis_server.client()
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [
            {"id": "tick", "task": "demo.record_fire", "interval": 0.5, "overlap": "allow"},
            {"id": "yearly", "task": "demo.record_fire", "cron": YEARLY},
            {
                "id": "slow",
                "task": "demo.record_fire",
                "cron": YEARLY,
                "kwargs": {"seconds": 60, "until": "release-slow"},
            },
        ],
    )
    first, second = start_scheduler(settings, jobs, count=2)
    start_worker(settings, "--pool", "threads", "--concurrency", "4")
    wait_for(lambda: len(ran(client, settings, "tick")) >= 2, 20, "tick to run")

    listed = {row["id"]: row for row in as_json(settings, "jobs", "list")}
    assert set(listed) == {"tick", "yearly", "slow"}
    assert listed["tick"]["trigger"] == "every 0.5s"
    assert listed["yearly"]["next_fire"].endswith("-01-01T00:00:00+00:00")
    assert listed["tick"]["last_outcome"] in ("dispatched", "running", "succeeded")
    assert not listed["tick"]["paused"]

    # Pause: within a second no replica dispatches it; its fires are recorded as skipped.
    chronoq(settings, "jobs", "pause", "tick", "--note", "maintenance window")
    paused_at = time.time()
    time.sleep(2.5)  # the window in which nothing may run (a negative: no condition to wait for)
    assert [e for e in ran(client, settings, "tick") if epoch(e["scheduled_at"]) > paused_at + 1] == []
    # Counted as they fall due: a loaded machine may not have recorded two within the window.
    shown = wait_for(
        lambda: (found := as_json(settings, "jobs", "show", "tick"))["counters"]["skipped"] >= 2 and found,
        20,
        "two skipped fires",
    )
    assert shown["paused"]
    assert shown["paused_note"] == "maintenance window"
    assert any(f["outcome"] == "skipped" and f["reason"] == "paused" for f in shown["history"])
    assert shown["audit"][0]["action"] == "pause"
    assert shown["audit"][0]["note"] == "maintenance window"

    # Every replica holds the pause: hand the lead over (SIGTERM) and add a new replica.
    leader = client.get(f"{settings.redis.key_prefix}leader")
    stopping = first if leader == first.owner else second
    assert stopping.stop() == 0
    start_scheduler(settings, jobs)
    handed_over_at = time.time()
    time.sleep(2.5)  # the window in which nothing may run
    assert [e for e in ran(client, settings, "tick") if epoch(e["scheduled_at"]) > paused_at + 1] == []
    wait_for(lambda: as_json(settings, "jobs", "show", "tick")["counters"]["skipped"] >= 5, 20, "five skipped fires")

    chronoq(settings, "jobs", "resume", "tick")
    resumed_at = time.time()
    wait_for(
        lambda: any(epoch(e["scheduled_at"]) > resumed_at for e in ran(client, settings, "tick")),
        5,
        "tick to run again after resume",
    )
    assert handed_over_at < resumed_at

    # A manual trigger runs once, and is in the history as a manual fire.
    triggered = as_json(settings, "jobs", "trigger", "yearly", "--note", "rerun report")
    assert triggered["outcome"] == "dispatched"
    wait_for(lambda: ran(client, settings, "yearly"), 10, "the triggered fire to run")
    time.sleep(1.5)
    runs = ran(client, settings, "yearly")
    assert len(runs) == 1
    assert runs[0]["task_id"] == triggered["task_id"]
    history = as_json(settings, "jobs", "history", "yearly")
    assert [(f["trigger"], f["outcome"]) for f in history] == [("manual", "dispatched")]

    # Overlap policy: a second trigger while the first runs is skipped, unless forced. The run
    # lasts until the test releases it (a 4 s run ended, on a loaded machine, before the CLI
    # that was to be refused had started).
    assert as_json(settings, "jobs", "trigger", "slow")["outcome"] == "dispatched"
    wait_for(lambda: ran(client, settings, "slow"), 10, "the slow fire to start")
    refused = chronoq(settings, "jobs", "trigger", "slow", "--json", check=False)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["outcome"] == "skipped"
    assert "overlap" in json.loads(refused.stdout)["reason"]
    assert as_json(settings, "jobs", "trigger", "slow", "--force")["outcome"] == "dispatched"
    wait_for(lambda: len(ran(client, settings, "slow")) == 2, 10, "the forced fire to run")
    client.set(f"{settings.redis.key_prefix}release-slow", 1)
    # Both runs end now: the test leaves nothing running or unacknowledged on the shared server.
    wait_for(
        lambda: (
            [f.get("run") for f in fires(client, settings, "slow") if f["outcome"] == "dispatched"]
            == ["succeeded", "succeeded"]
        ),
        15,
        "the slow fires to end once released",
    )

    status = as_json(settings, "status")
    alive = [r for r in status["replicas"] if r["alive"]]
    assert len(alive) == 2
    assert [r["role"] for r in alive].count("leader") == 1
    assert any(w["seen"] and settings.celery.cron_queue in w["queues"] for w in status["workers"])
    assert set(status["queues"]) == {settings.celery.cron_queue, settings.celery.default_queue}
    assert status["counters"]["dispatched"] >= 5
    assert status["counters"]["skipped"] >= 5
    text = chronoq(settings, "status").stdout
    assert "leader" in text and "workers" in text

    unknown = chronoq(settings, "jobs", "pause", "nope", check=False)
    assert unknown.returncode == 1
    assert "no job 'nope'" in unknown.stdout


def test_remove_stays_removed_until_the_file_changes(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
) -> None:
    client = redis_server.client()
    spec = {"id": "tick", "task": "demo.sleep", "interval": 0.5, "args": [0], "overlap": "allow"}
    other = {"id": "other", "task": "demo.sleep", "cron": YEARLY, "args": [0]}
    jobs = write_jobs(tmp_path / "jobs.yaml", [spec, other])
    queue = settings.celery.cron_queue
    (replica,) = start_scheduler(settings, jobs)
    wait_for(lambda: client.llen(queue) >= 2, 20, "tick to be dispatched")

    chronoq(settings, "jobs", "remove", "tick", "--note", "retired")
    time.sleep(1.5)
    settled = client.llen(queue)
    time.sleep(1.5)
    assert client.llen(queue) == settled, "a removed job was still dispatched"
    assert [row["id"] for row in as_json(settings, "jobs", "list")] == ["other"]

    # A restart with the same file keeps it removed...
    assert replica.stop() == 0
    (replica,) = start_scheduler(settings, jobs)
    wait_for(lambda: "job stays removed" in replica.log(), 15, "the restarted replica to keep the job removed")
    time.sleep(1.5)  # the window in which nothing may be dispatched
    assert client.llen(queue) == settled

    # ...a reload of a changed file brings it back.
    write_jobs(jobs, [{**spec, "description": "back again"}, other])
    replica.signal(signal.SIGHUP)
    wait_for(lambda: client.llen(queue) > settled, 10, "the changed job to come back")
    assert "tick" in [row["id"] for row in as_json(settings, "jobs", "list")]
    actions = [entry["action"] for entry in as_json(settings, "jobs", "show", "tick")["audit"]]
    assert actions[:2] == ["restore", "remove"]
    assert as_json(settings, "jobs", "show", "tick")["audit"][1]["note"] == "retired"


async def test_leader_forgets_replicas_that_stopped_beating(settings: AppSettings) -> None:
    from scheduler.leadership import PRUNE_EVERY_TICKS, STALE_REPLICA_S, Leadership
    from shared.names import RedisKeys
    from shared.redis import create_async_redis

    client = create_async_redis(settings.redis)
    keys = RedisKeys(settings.redis.key_prefix)
    try:
        stale = json.dumps({"heartbeat_ms": int((time.time() - STALE_REPLICA_S - 5) * 1000)})
        recent = json.dumps({"heartbeat_ms": int((time.time() - 5) * 1000)})
        await client.hset(keys.replicas, mapping={"gone:1:x": stale, "quiet:2:y": recent})
        leadership = Leadership(client, keys, "me:3:z", lease_ms=2000)
        for _ in range(PRUNE_EVERY_TICKS):
            assert await leadership.tick()
        assert sorted(await client.hkeys(keys.replicas)) == ["me:3:z", "quiet:2:y"]
    finally:
        await client.aclose()
