"""Coalescing holds whatever stalled the dispatch path (issue #11, defect 1).

A ``coalesce: true`` job every second; Redis is cut off from the scheduler, paused, or the
scheduler itself is frozen. Afterwards, the fires due in the gap became ONE dispatch (the
newest overdue when they were finally decided) and the rest are recorded coalesced (within their
grace) or missed (past it); every nominal fire has exactly one outcome record, and the workers
ran no fire twice. Counted from Redis (the fire records) and from what the workers ran.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import SchedulerProcess, WorkerProcess, executions, make_settings, wait_for, write_jobs
from tests.faults.harness import RedisProcess, TcpProxy

pytestmark = pytest.mark.timeout(120)

GRACE_S = {"c60": 60, "c4": 4}
JOBS = [
    {
        "id": job_id,
        "task": "demo.record_fire",
        "interval": 1,
        "coalesce": True,
        "overlap": "allow",
        "misfire_grace_time": grace,
    }
    for job_id, grace in GRACE_S.items()
]


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def records(client: redis.Redis, settings: AppSettings, job_id: str) -> list[dict[str, str]]:
    """The job's fire records, oldest first."""
    keys = RedisKeys(settings.redis.key_prefix)
    stamps = [str(s) for s in client.lrange(keys.history(job_id), 0, -1)]
    return [{str(k): str(v) for k, v in client.hgetall(keys.fire(job_id, stamp)).items()} for stamp in reversed(stamps)]


def brief(fires: list[dict[str, str]], since: float) -> list[str]:
    """The fires from ``since`` on, one short line each, for failure messages."""
    return [
        f"{f['scheduled_at'][11:19]} {f['outcome']} {f.get('reason', '')[-8:]} decided={f.get('decided_ms', '')}"
        for f in fires
        if epoch(f["scheduled_at"]) > since - 2
    ]


def check_one_dispatch_for_the_gap(
    client: redis.Redis, settings: AppSettings, job_id: str, fault_from: float, fault_until: float
) -> dict[str, Any]:
    """The promises of a coalescing job across a fault from ``fault_from`` to ``fault_until``
    (epoch s); returns what was counted, for the failure messages of the caller."""
    fires = records(client, settings, job_id)
    times = [epoch(f["scheduled_at"]) for f in fires]
    # Every nominal fire (one a second) between the first and the last has exactly one record.
    assert len(times) == len(set(times)), f"{job_id}: a fire recorded twice"
    assert times == [times[0] + i for i in range(len(times))], f"{job_id}: a nominal fire without an outcome"
    assert all(f.get("outcome") in ("dispatched", "coalesced", "missed") for f in fires), fires
    gap = [f for f in fires if fault_from < epoch(f["scheduled_at"]) <= fault_until]
    assert len(gap) >= 4, f"{job_id}: the fault covered too few fires: {gap}"
    # Fires due in the gap could not be decided in time: they are coalesced into one fire (the
    # newest overdue when they were finally decided), or missed past their grace; that one fire
    # is the only dispatch from the start of the fault up to it. When the first decision after
    # the fault comes later than a short grace (a loaded machine), every fire of the gap is
    # missed and the ones due since the fault ended are the ones coalesced: count those too
    # (up to 10 s after it: later coalescing would be another stall's).
    after = [f for f in fires if fault_from < epoch(f["scheduled_at"]) <= fault_until + 10]
    into = {f["reason"].removeprefix("coalesced into ") for f in after if f["outcome"] == "coalesced"}
    assert len(into) == 1, f"{job_id}: coalesced into {into}: {brief(fires, fault_from)}"
    target = next(f for f in fires if f["scheduled_at"] == next(iter(into)))
    assert target["outcome"] == "dispatched"
    between = [f for f in fires if fault_from < epoch(f["scheduled_at"]) <= epoch(target["scheduled_at"])]
    stale = [f["scheduled_at"] for f in between if f["outcome"] == "dispatched" and f is not target]
    assert stale == [], f"{job_id}: fires of the gap dispatched one by one: {stale}"
    grace = GRACE_S[job_id]
    for fire in between:
        decided_s = int(fire["decided_ms"]) / 1000
        late_s = decided_s - epoch(fire["scheduled_at"])
        if fire["outcome"] == "missed":
            assert late_s > grace - 0.5, f"{job_id}: missed within its grace: {fire}"
        elif fire["outcome"] == "coalesced":
            assert late_s <= grace + 0.5, f"{job_id}: coalesced past its grace: {fire}"
    return {"gap": len(gap), "outcomes": Counter(f["outcome"] for f in gap), "into": target["scheduled_at"]}


def no_duplicate_runs(client: redis.Redis, settings: AppSettings) -> None:
    runs = Counter((run["job_id"], run["scheduled_at"]) for run in executions(client, settings))
    assert [fire for fire, n in runs.items() if n > 1] == []


def settle(client: redis.Redis, settings: AppSettings) -> None:
    wait_for(
        lambda: client.llen(settings.celery.cron_queue) == 0 and client.hlen("unacked") == 0,
        30,
        "the workers to finish the queued fires",
    )


def running_fleet(
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
    *,
    scheduler_url: Callable[[RedisProcess], str] | None = None,
    count: int = 1,
    appendonly: bool = False,
) -> tuple[RedisProcess, redis.Redis, AppSettings, list[SchedulerProcess]]:
    """Redis, one worker (straight to Redis), ``count`` schedulers (through ``scheduler_url``)
    running JOBS until a few fires of each have run."""
    server = redis_process(appendonly=appendonly)
    settings = make_settings(server.url, namespace, redis={"socket_timeout_s": 2})
    start_worker(settings, "--pool", "threads", "--concurrency", "4")
    url = scheduler_url(server) if scheduler_url else server.url
    jobs = write_jobs(tmp_path / "jobs.yaml", JOBS)
    replicas = start_scheduler(make_settings(url, namespace, redis={"socket_timeout_s": 2}), jobs, count=count)
    client = server.client()
    wait_for(lambda: len(executions(client, settings)) >= 6, 30, "the jobs to run")
    return server, client, settings, replicas


def finish(client: redis.Redis, settings: AppSettings, replicas: list[SchedulerProcess], after_s: float) -> None:
    """Let the schedulers run ``after_s`` more seconds (waiting on records, not sleeping blind),
    stop them, and let the workers finish."""
    until = time.time() + after_s
    wait_for(
        lambda: all(
            records(client, settings, j) and epoch(records(client, settings, j)[-1]["scheduled_at"]) >= until
            for j in GRACE_S
        ),
        after_s + 20,
        "fires after the fault",
    )
    for replica in replicas:
        assert replica.stop() == 0
    settle(client, settings)


def test_redis_cut_off_from_the_scheduler_for_9s(
    redis_process: Callable[..., RedisProcess],
    tcp_proxy: Callable[[int], TcpProxy],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    proxies: list[TcpProxy] = []

    def through_proxy(server: RedisProcess) -> str:
        proxies.append(tcp_proxy(server.port))
        return proxies[0].url()

    _, client, settings, replicas = running_fleet(
        redis_process, start_worker, start_scheduler, tmp_path, namespace, scheduler_url=through_proxy
    )
    cut_at = time.time()
    proxies[0].cut()
    time.sleep(9)  # the fault itself lasts this long; what it did is counted afterwards
    proxies[0].restore()
    restored_at = time.time()
    finish(client, settings, replicas, after_s=4)
    for job_id in GRACE_S:
        seen = check_one_dispatch_for_the_gap(client, settings, job_id, cut_at, restored_at)
        if job_id == "c4":
            assert seen["outcomes"]["missed"] >= 2, seen  # the oldest fires of a 9 s gap are past a 4 s grace
        else:
            assert seen["outcomes"]["missed"] == 0, seen
    no_duplicate_runs(client, settings)


def test_redis_down_30s_then_back_from_its_aof(
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """The whole Redis gone for 30 s (scheduler and worker both lose it), back with its AOF:
    both processes ride it out, the scheduler retries and says so, and the 30 fires of the gap
    end as one dispatch per job (plus misses past a 4 s grace), each run once."""
    server, client, settings, replicas = running_fleet(
        redis_process, start_worker, start_scheduler, tmp_path, namespace, appendonly=True
    )
    (scheduler,) = replicas
    down_at = time.time()
    server.stop()
    time.sleep(30)  # the outage itself; what it did is counted afterwards
    server.start()
    back_at = time.time()
    # Retried, not given up: a fire due after Redis came back is decided and run.
    wait_for(
        lambda: any(epoch(r["scheduled_at"]) > back_at for r in executions(client, settings)),
        30,
        "a fire due after the outage to run",
    )
    assert scheduler.process.poll() is None, scheduler.log()[-2000:]
    finish(client, settings, replicas, after_s=4)
    for job_id in GRACE_S:
        seen = check_one_dispatch_for_the_gap(client, settings, job_id, down_at, back_at)
        assert seen["gap"] >= 28, seen
        if job_id == "c4":
            assert seen["outcomes"]["missed"] >= 20, seen  # most of a 30 s gap is past a 4 s grace
        else:
            assert seen["outcomes"]["missed"] == 0, seen  # all within a 60 s grace: coalesced
    no_duplicate_runs(client, settings)
    log = scheduler.log()
    assert "dispatch failed" in log, "the outage was not reported"
    assert "Traceback" not in log, log[-3000:]


def test_redis_paused_6s(
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    server, client, settings, replicas = running_fleet(
        redis_process, start_worker, start_scheduler, tmp_path, namespace
    )
    paused_at = time.time()
    server.pause_clients(6000, "ALL")
    wait_for(server.answers, 15, "the pause to end")
    resumed_at = paused_at + 6
    finish(client, settings, replicas, after_s=4)
    for job_id in GRACE_S:
        check_one_dispatch_for_the_gap(client, settings, job_id, paused_at, resumed_at)
    no_duplicate_runs(client, settings)


def test_scheduler_frozen_6s(
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    _, client, settings, replicas = running_fleet(redis_process, start_worker, start_scheduler, tmp_path, namespace)
    (scheduler,) = replicas
    scheduler.signal(signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(6)  # the fault itself
    scheduler.signal(signal.SIGCONT)
    resumed_at = time.time()
    finish(client, settings, replicas, after_s=4)
    for job_id in GRACE_S:
        seen = check_one_dispatch_for_the_gap(client, settings, job_id, stopped_at, resumed_at)
        # No stale fire went out before coalescing began: the one dispatch of the gap is the
        # newest fire due when the scheduler woke up.
        assert epoch(seen["into"]) >= resumed_at - 1.5, seen
    no_duplicate_runs(client, settings)


def test_leader_partitioned_with_two_replicas_doubles_nothing(
    redis_process: Callable[..., RedisProcess],
    tcp_proxy: Callable[[int], TcpProxy],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    proxies: list[TcpProxy] = []

    def own_proxy(server: RedisProcess) -> str:
        proxies.append(tcp_proxy(server.port))
        return proxies[-1].url()

    server = redis_process(appendonly=False)
    settings = make_settings(server.url, namespace, redis={"socket_timeout_s": 2})
    start_worker(settings, "--pool", "threads", "--concurrency", "4")
    jobs = write_jobs(tmp_path / "jobs.yaml", JOBS)
    replicas = [
        start_scheduler(make_settings(own_proxy(server), namespace, redis={"socket_timeout_s": 2}), jobs)[0]
        for _ in range(2)
    ]
    client = server.client()
    wait_for(lambda: len(executions(client, settings)) >= 6, 30, "the jobs to run")
    leader = wait_for(lambda: client.get(f"{settings.redis.key_prefix}leader"), 10, "a leader")
    index = next(i for i, r in enumerate(replicas) if r.owner == leader)
    cut_at = time.time()
    proxies[index].cut()
    wait_for(lambda: client.get(f"{settings.redis.key_prefix}leader") not in (None, leader), 15, "a new leader")
    time.sleep(3)  # the survivor leads for a while
    proxies[index].restore()
    restored_at = time.time()
    finish(client, settings, replicas, after_s=4)
    for job_id in GRACE_S:
        fires = records(client, settings, job_id)
        times = [epoch(f["scheduled_at"]) for f in fires]
        assert len(times) == len(set(times))
        assert times == [times[0] + i for i in range(len(times))], f"{job_id}: a nominal fire without an outcome"
        after = [f for f in fires if cut_at + 3 < epoch(f["scheduled_at"]) < restored_at]
        assert after and all(f["owner"] != leader for f in after), "the partitioned leader decided fires"
    no_duplicate_runs(client, settings)
