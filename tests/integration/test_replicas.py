"""Several run_scheduler.py replicas and two workers against one redis-server: each fire runs
once whatever happens to a replica, and max_instances holds across the fleet.

Duplicates and gaps are counted from what the workers executed (``demo.record_fire`` appends
each run to a list), not from the schedulers' own accounts.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import RedisServer, SchedulerProcess, WorkerProcess, executions, wait_for, write_jobs

pytestmark = pytest.mark.timeout(150)


def epoch(scheduled_at: str) -> float:
    return datetime.fromisoformat(scheduled_at).timestamp()


def fires(client: Any, settings: AppSettings, job_id: str) -> list[dict[str, str]]:
    """The job's fire hashes, oldest first."""
    keys = RedisKeys(settings.redis.key_prefix)
    stamps = client.lrange(keys.history(job_id), 0, -1)
    return [client.hgetall(keys.fire(job_id, stamp)) for stamp in reversed(stamps)]


def gaps_and_duplicates(runs: list[dict[str, Any]], interval_s: float) -> tuple[list[float], list[str]]:
    """Nominal times missing between the first and the last run, and runs of one fire twice."""
    counts = Counter(run["scheduled_at"] for run in runs)
    duplicates = [at for at, n in counts.items() if n > 1]
    times = sorted(epoch(at) for at in counts)
    gaps = [t for t, after in itertools.pairwise(times) if after - t > interval_s * 1.5]
    return gaps, duplicates


def settle(client: Any, settings: AppSettings, workers: tuple[WorkerProcess, ...] = ()) -> None:
    """Wait until every queued fire has run (the queue is empty and nothing is unacked); a
    failure says what is still queued or unacknowledged, and the end of each worker's log."""
    queue = settings.celery.cron_queue

    def unacked() -> dict[str, str]:
        # kombu's unacked hash is shared by every test on this server: count this test's only.
        entries = client.hgetall("unacked").items()
        return {tag: entry for tag, entry in entries if json.loads(entry)[2] == queue}

    try:
        wait_for(lambda: client.llen(queue) == 0 and not unacked(), 20, "the workers to finish the queued fires")
    except pytest.fail.Exception:
        unacked_now = {tag: str(entry)[:300] for tag, entry in client.hgetall("unacked").items()}
        index = client.zrange("unacked_index", 0, -1, withscores=True)
        logs = "\n".join(f"--- {w.hostname}\n{w.log()[-3000:]}" for w in workers)
        pytest.fail(f"queue={client.llen(queue)} unacked={unacked_now} index={index} at {time.time():.1f}\n{logs}")


def leader_of(client: Any, settings: AppSettings, replicas: list[SchedulerProcess]) -> SchedulerProcess:
    owner = wait_for(lambda: client.get(f"{settings.redis.key_prefix}leader"), 10, "a leader")
    return next(r for r in replicas if r.owner == owner)


@pytest.fixture
def two_workers(
    settings: AppSettings, start_worker: Callable[..., WorkerProcess]
) -> tuple[WorkerProcess, WorkerProcess]:
    return (
        start_worker(settings, "--pool", "threads", "--concurrency", "4", name="a"),
        start_worker(settings, "--pool", "threads", "--concurrency", "4", name="b"),
    )


def test_sigkill_of_the_leader_loses_and_doubles_nothing(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    two_workers: tuple[WorkerProcess, WorkerProcess],
) -> None:
    client = redis_server.client()
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        # coalesce off: a takeover batch decided late on a loaded machine would rightly merge two
        # overdue fires into one (see test_dispatch_faults); this test counts every fire's run.
        [
            {"id": f"j{i}", "task": "demo.record_fire", "interval": 1, "overlap": "allow", "coalesce": False}
            for i in range(3)
        ],
    )
    replicas = start_scheduler(settings, jobs, count=3)
    wait_for(lambda: len(executions(client, settings)) >= 9, 20, "the jobs to run")
    leader = leader_of(client, settings, replicas)
    leader.signal(signal.SIGKILL)
    killed_at = time.time()
    time.sleep(6)
    for replica in replicas:
        replica.stop()
    settle(client, settings, two_workers)

    survivors = {r.owner for r in replicas if r is not leader}
    for job_id in ("j0", "j1", "j2"):
        runs = [e for e in executions(client, settings) if e["job_id"] == job_id]
        gaps, duplicates = gaps_and_duplicates(runs, 1.0)
        assert gaps == [], f"{job_id}: fires missing after {gaps}"
        assert duplicates == [], f"{job_id}: fires run twice: {duplicates}"
        after_kill = [f for f in fires(client, settings, job_id) if epoch(f["scheduled_at"]) > killed_at]
        assert len(after_kill) >= 4, "the survivors did not carry on"
        assert {f["owner"] for f in after_kill} <= survivors
        assert {f["outcome"] for f in after_kill} == {"dispatched"}
    new_leader = client.get(f"{settings.redis.key_prefix}leader")
    assert new_leader is None or new_leader in survivors


def test_a_stalled_replica_dispatches_nothing_when_it_comes_back(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    two_workers: tuple[WorkerProcess, WorkerProcess],
) -> None:
    client = redis_server.client()
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [{"id": "tick", "task": "demo.record_fire", "interval": 0.5, "overlap": "allow", "coalesce": False}],
    )
    replicas = start_scheduler(settings, jobs, count=2, extra_env={"SCHEDULER_TAKEOVER_S": "1"})
    wait_for(lambda: len(executions(client, settings)) >= 4, 20, "tick to run")
    stalled = leader_of(client, settings, replicas)
    stalled.signal(signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(4)  # four lease lengths
    stalled.signal(signal.SIGCONT)
    resumed_at = time.time()
    # It wakes up with every fire of the last 4 s due at once, and believes it still leads.
    wait_for(lambda: "is now a follower" in stalled.log(), 10, "the stalled replica to notice it lost the lease")
    time.sleep(2)
    for replica in replicas:
        replica.stop()
    settle(client, settings)

    runs = executions(client, settings)
    gaps, duplicates = gaps_and_duplicates(runs, 0.5)
    assert gaps == []
    assert duplicates == []
    during = [f for f in fires(client, settings, "tick") if stopped_at < epoch(f["scheduled_at"]) < resumed_at]
    assert len(during) >= 6
    assert all(f["owner"] != stalled.owner for f in during), "the stalled replica dispatched a taken-over fire"
    assert all(f["outcome"] == "dispatched" for f in during)


def _runs(client: Any, settings: AppSettings, job_id: str) -> list[dict[str, str]]:
    return [f for f in fires(client, settings, job_id) if "started_ms" in f]


def _overlapping(runs: list[dict[str, str]]) -> list[tuple[str, str]]:
    spans = sorted((int(f["started_ms"]), int(f.get("finished_ms") or 2**62), f["scheduled_at"]) for f in runs)
    return [(a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


@pytest.mark.parametrize("overlap", ["skip", "buffer_one"])
def test_max_instances_holds_across_replicas_and_workers(
    overlap: str,
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    two_workers: tuple[WorkerProcess, WorkerProcess],
) -> None:
    client = redis_server.client()
    # A task of 2.5 s fired every second, max_instances 1: at most one runs anywhere.
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [
            {
                "id": "long",
                "task": "demo.record_fire",
                "interval": 1,
                "kwargs": {"seconds": 2.5},
                "max_instances": 1,
                "overlap": overlap,
            }
        ],
    )
    replicas = start_scheduler(settings, jobs, count=2)
    wait_for(lambda: len(_runs(client, settings, "long")) >= 3, 30, "three runs")
    for replica in replicas:
        replica.stop()
    settle(client, settings)

    recorded = fires(client, settings, "long")
    runs = _runs(client, settings, "long")
    assert _overlapping(runs) == [], "two runs of a max_instances=1 job overlapped"
    assert len({e["scheduled_at"] for e in executions(client, settings)}) == len(executions(client, settings))
    skipped = [f for f in recorded if f["outcome"] == "skipped"]
    assert len(skipped) >= 2
    assert all("overlap" in f["reason"] for f in skipped)
    counters = client.hgetall(RedisKeys(settings.redis.key_prefix).job_counters("long"))
    assert int(counters["skipped"]) == len(skipped)
    if overlap == "buffer_one":
        # The waiting fire goes out as soon as the slot frees: runs follow each other closely.
        waited = [f for f in runs if f.get("reason") == "buffered until a slot freed"]
        assert len(waited) >= 2
        spans = sorted((int(f["started_ms"]), int(f["finished_ms"])) for f in runs if "finished_ms" in f)
        pauses = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        assert pauses and max(pauses) < 1500, f"a buffered fire waited {max(pauses)} ms after the slot freed"
    else:
        assert not [f for f in recorded if f["outcome"] == "buffered"]
