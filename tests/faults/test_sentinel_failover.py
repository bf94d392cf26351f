"""Redis Sentinel failover under load (#15), with real processes only.

Debian's ``redis-server`` (a master and a replica) and three ``redis-sentinel`` on loopback
ports (``tests/faults/sentinel_harness.py``); a scheduler and a threads worker that find the
master only through the Sentinels (``REDIS_SENTINELS``, no ``REDIS_URL``); 20 jobs every 0.5 s
running the ledger task, whose runs are written to a separate Redis that is never failed over.

Each scenario fails the master over once, then counts, per job and nominal fire time, from
the new master's fire records and from the ledger:

- **gaps**: a fire with no record and no run (lost);
- **unrecorded**: a fire that ran but whose record is not on the new master (the write went
  to the old master and was not replicated);
- **duplicates**: a fire run more than once;
- **dispatched, never ran**: a record says dispatched, the ledger has no run.

A probe thread meanwhile appends a sequence number every millisecond through chronoq's own
Sentinel client; the acknowledged numbers missing on the new master measure the window of
writes the failover discarded. Times are printed (run with ``-s``), not asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.names import RedisKeys
from shared.redis import create_redis
from shared.settings import AppSettings
from tests.conftest import SchedulerProcess, WorkerProcess, wait_for, write_jobs
from tests.faults.harness import RedisProcess
from tests.faults.ledger_tasks import read_ledger
from tests.faults.sentinel_harness import DATA_PASSWORD, MASTER_NAME, SENTINEL_PASSWORD, SentinelGroup
from tests.faults.test_worker_faults import fault_env

pytestmark = pytest.mark.timeout(120)

JOBS = [
    {
        "id": f"s{i:02d}",
        "task": "faults.ledger",
        "interval": 0.5,
        "coalesce": True,
        "overlap": "allow",
        "misfire_grace_time": 30,
    }
    for i in range(20)
]
PLANNED_FAILOVER = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "planned-failover.sh"
RUN_AFTER_S = 6.0
OLD_MASTER_DEMOTED_S = 12.0
"""After a plain ``SENTINEL FAILOVER`` the Sentinels turn the old master into a replica (which
refuses writes) about 11.3 s after the promotion (measured here)."""
"""How long the fleet keeps firing after the new master is in place."""


WAIT_TIMEOUT_MS = 200
WAIT_ENV = {"REDIS_WAIT_REPLICAS": "1", "REDIS_WAIT_TIMEOUT_MS": str(WAIT_TIMEOUT_MS)}
"""``WAIT``-based durability: every chronoq write waits for the one replica."""


def sentinel_settings(group: SentinelGroup, namespace: str, wait: bool = False) -> AppSettings:
    return AppSettings(
        _env_file=None,
        redis={
            "wait_replicas": 1 if wait else 0,
            "wait_timeout_ms": WAIT_TIMEOUT_MS,
            "sentinels": group.addresses,
            "sentinel_master": MASTER_NAME,
            "sentinel_password": SENTINEL_PASSWORD,
            "password": DATA_PASSWORD,
            "key_prefix": f"t{namespace}:",
            "socket_timeout_s": 2,
            "socket_connect_timeout_s": 1,
        },
        celery={
            "cron_queue": f"cron_{namespace}",
            "default_queue": f"celery_{namespace}",
            "visibility_timeout_s": 10,
            "task_time_limit_s": 5,
        },
        scheduler={"slot_margin_s": 1},
    )


@dataclass
class Probe:
    """Appends 1, 2, 3... to a list every millisecond through a Sentinel client, from a thread;
    remembers when each was acknowledged."""

    client: redis.Redis
    acked: dict[int, float] = field(default_factory=dict)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    key: str = "sentinel-probe"

    def start(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.client.rpush(self.key, n + 1)
                n += 1
                self.acked[n] = time.time()
            except redis.RedisError:
                self.errors += 1
                time.sleep(0.02)
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def lost(self, master: RedisProcess) -> list[float]:
        """When (epoch s) each acknowledged append that the master lacks was acknowledged."""
        with master.client() as client:
            present = {int(v) for v in client.lrange(self.key, 0, -1)}
        return sorted(at for n, at in self.acked.items() if n not in present)


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def account(master: RedisProcess, ledger: RedisProcess, settings: AppSettings, since: float) -> dict[str, Any]:
    """Per nominal fire from ``since`` to the newest record of each job: gaps, unrecorded runs,
    duplicates, dispatched fires that never ran, and the outcomes. A run is matched to its
    fire by task id (derived from job and nominal time), else by its headers."""
    keys = RedisKeys(settings.redis.key_prefix)
    with ledger.client() as client:
        starts = [e for e in read_ledger(client) if e["event"] == "start"]
    by_task: dict[str, list[dict[str, Any]]] = {}
    by_fire: Counter[tuple[str, float]] = Counter()
    for entry in starts:
        by_task.setdefault(entry["task_id"], []).append(entry)
        by_fire[(entry["job_id"], epoch(entry["scheduled_at"]))] += 1
    counts: Counter[str] = Counter()
    where: dict[str, list[str]] = {}
    with master.client() as client:
        for job in JOBS:
            job_id = str(job["id"])
            stamps = [str(s) for s in client.lrange(keys.history(job_id), 0, -1)]
            records = {epoch(s): client.hgetall(keys.fire(job_id, s)) for s in stamps}
            t = since - since % 0.5 + 0.5
            while t <= max(records):
                record = records.get(t)
                outcome = record.get("outcome") if record else None
                task_id = record.get("task_id") if record else None
                ran = len(by_task.get(task_id, [])) if task_id else by_fire.get((job_id, t), 0)
                counts["fires"] += 1
                counts[outcome or "no record"] += 1
                if record and record.get("run"):
                    counts[f"run {record['run']}"] += 1
                problem = None
                if outcome is None and ran == 0:
                    problem = "gaps"
                elif outcome is None:
                    problem = "unrecorded"
                elif ran > 1:
                    problem = "duplicates"
                elif outcome != "dispatched" and ran > 0:
                    problem = "ran, not dispatched"
                elif outcome == "dispatched" and ran == 0:
                    problem = "dispatched, never ran"
                elif outcome == "dispatched" and (record or {}).get("run") != "succeeded":
                    problem = "ran, outcome not recorded"
                if problem:
                    counts[problem] += 1
                    runs = [f"{e['pid']}@{e['ms']}" for e in by_task.get(task_id or "", [])]
                    where.setdefault(problem, []).append(f"{job_id}@{t:.1f} task={str(task_id)[:8]} runs={runs}")
                t += 0.5
    return {"counts": counts, "where": where}


def run_failover(
    fail: Callable[[SentinelGroup], float],
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
    run_after_s: float = RUN_AFTER_S,
    wait: bool = False,
    logs: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[float], float, float, float]:
    """The fleet under load, one failover by ``fail``, the accounting (fires until
    ``run_after_s`` past the promotion); returns it with the probe's lost writes, when the
    failover began, the promotion and the first fresh run. ``wait``: every process (and the
    probe) with ``WAIT``-based durability; ``logs`` receives the processes' logs."""
    ledger = redis_process(appendonly=False)
    settings = sentinel_settings(sentinel_group, namespace, wait)
    env = {**fault_env(ledger), **(WAIT_ENV if wait else {})}
    worker = start_worker(settings, "--pool", "threads", "--concurrency", "8", extra_env=env)
    (scheduler,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS), extra_env=env)
    with ledger.client() as ledger_client:
        wait_for(lambda: len(read_ledger(ledger_client)) >= 80, 30, "the jobs to run")
    began = time.time()
    probe = Probe(create_redis(settings.redis)).start()
    old = sentinel_group.master_port()
    try:
        wait_for(lambda: len(probe.acked) >= 200, 10, "the probe to write")
        at = fail(sentinel_group)
        new = sentinel_group.wait_promoted(old)
        promoted = time.time()

        def fresh_run() -> float | None:
            # A run of a fire due after the failover began: the fleet fires again.
            starts = [e for e in read_ledger(ledger_client) if e["event"] == "start" and epoch(e["scheduled_at"]) > at]
            return min(e["ms"] for e in starts) / 1000 if starts else None

        flowing = wait_for(fresh_run, 30, "fires to run again after the failover")
        wait_for(lambda: time.time() > promoted + run_after_s, run_after_s + 1, "the fleet to run on")
    finally:
        probe.stop()
    assert scheduler.stop() == 0, scheduler.log()[-3000:]
    with new.client() as client:
        wait_for(
            lambda: client.llen(settings.celery.cron_queue) == 0 and client.hlen("unacked") == 0,
            30,
            "the worker to finish the queued fires",
        )
    result = account(new, ledger, settings, began)
    # The worker's reconnect to the new master stopped its consumer's steps quietly (issue #23).
    assert "Error on restarting" not in worker.log(), worker.log()[-5000:]
    # For a failure message: what the worker said about each fire run twice or never.
    tasks = {
        f.split("task=")[1].split()[0]
        for p in ("duplicates", "dispatched, never ran")
        for f in result["where"].get(p, [])
    }
    result["worker log"] = [line[:300] for line in worker.log().splitlines() if any(t in line for t in tasks)]
    if logs is not None:
        logs.update(scheduler=scheduler.log(), worker=worker.log())
    return result, probe.lost(new), at, promoted, flowing


def report(name: str, result: dict[str, Any], lost: list[float], at: float, promoted: float, flowing: float) -> None:
    window = f"{(lost[-1] - lost[0]) * 1000:.0f} ms, from {lost[0] - at:+.2f} s" if lost else "none"
    print(
        f"\n{name}: promoted after {promoted - at:.2f} s, fires ran again after {flowing - at:.2f} s; "
        f"probe: {len(lost)} acknowledged writes lost ({window}); {dict(result['counts'])}; {result['where']}"
    )
    for line in result["worker log"]:
        print(f"  worker: {line}")


def test_sigkill_of_the_master_under_load(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """SIGKILL the master: the replica is promoted and every process follows it without a
    restart; fires due meanwhile are decided after it within their grace (coalesced into one
    per job, or dispatched); nothing is lost or run twice beyond what replication lag lost."""
    result, lost, at, promoted, flowing = run_failover(
        lambda group: group.kill_master()[1],
        sentinel_group,
        redis_process,
        start_worker,
        start_scheduler,
        tmp_path,
        namespace,
    )
    report("SIGKILL", result, lost, at, promoted, flowing)
    counts = result["counts"]
    assert counts["fires"] >= 20 * 2 * RUN_AFTER_S
    assert counts["missed"] == 0, result  # every fire of the failover was decided within its grace
    assert counts["coalesced"] >= 20, result  # the fires due during the failover became one per job
    assert counts["gaps"] == 0, result
    assert counts["duplicates"] == 0, result
    assert counts["dispatched, never ran"] == 0, result
    # A record can only be missing if replication lost it: then the probe lost writes too.
    assert counts["unrecorded"] == 0 or lost, result


def test_plain_sentinel_failover_loses_only_its_window(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """A plain ``SENTINEL FAILOVER``: the old master stays up and takes writes until the
    Sentinels name the new one; every process then moves over (``REDIS_SENTINEL_CHECK_S``)
    without a restart. What went to the old master in between is lost with it: fires that wrote in
    that window (due in it, or due before it and dispatched late) may be unrecorded, lost or run
    twice, and no fire outside it."""
    result, lost, at, promoted, flowing = run_failover(
        lambda group: group.failover(),
        sentinel_group,
        redis_process,
        start_worker,
        start_scheduler,
        tmp_path,
        namespace,
        run_after_s=OLD_MASTER_DEMOTED_S + 4,
    )
    report("SENTINEL FAILOVER", result, lost, at, promoted, flowing)
    counts, where = result["counts"], result["where"]
    assert counts["fires"] >= 20 * 2 * RUN_AFTER_S
    assert counts["missed"] == 0, counts
    # The clients move at their next check (REDIS_SENTINEL_CHECK_S), later on a loaded machine;
    # at the latest the old master refuses writes once the Sentinels have made it a replica.
    window = (at - 1.0, promoted + OLD_MASTER_DEMOTED_S + 1.0)
    for problem in ("gaps", "unrecorded", "duplicates", "dispatched, never ran"):
        outside = [f for f in where.get(problem, []) if not any(window[0] <= t <= window[1] for t in written_at(f))]
        assert outside == [], f"{problem} outside the failover window {window}: {outside}"


def written_at(fire: str) -> list[float]:
    """When a fire of :func:`account`'s report (``job@nominal task=… runs=['pid@ms', …]``) wrote
    to Redis: its nominal time, and the start of each of its runs. A fire due just before the
    window but dispatched late on a loaded machine (1.6 s once) writes its run's lease inside it,
    to the old master, and that write is lost with it."""
    nominal = float(fire.split("@", 1)[1].split()[0])
    runs = re.findall(r"'\d+@(\d+)'", fire.split(" runs=", 1)[1]) if " runs=" in fire else []
    return [nominal, *(int(ms) / 1000 for ms in runs)]


def test_planned_failover_loses_nothing(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """``deploy/redis/planned-failover.sh``: the old master is fenced (``min-replicas-to-write
    1``) before ``SENTINEL FAILOVER``, so it refuses writes from the moment its replica is
    promoted; chronoq retries them on the new master. No fire is lost, unrecorded or run twice,
    and the fires due meanwhile are decided within their grace."""
    scripts: list[subprocess.Popen[str]] = []

    def planned(group: SentinelGroup) -> float:
        started = time.time()
        env = {**os.environ, "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD, "REDIS_PASSWORD": DATA_PASSWORD}
        scripts.append(
            subprocess.Popen(
                ["sh", str(PLANNED_FAILOVER), f"127.0.0.1:{group.sentinels[1].port}", MASTER_NAME],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        return started

    result, lost, at, promoted, flowing = run_failover(
        planned, sentinel_group, redis_process, start_worker, start_scheduler, tmp_path, namespace
    )
    output, _ = scripts[0].communicate(timeout=60)
    report("planned failover", result, lost, at, promoted, flowing)
    assert scripts[0].returncode == 0, output
    assert "is a replica" in output, output
    counts = result["counts"]
    assert counts["fires"] >= 20 * 2 * RUN_AFTER_S
    assert lost == [], f"{len(lost)} acknowledged probe writes lost"
    for problem in ("missed", "gaps", "unrecorded", "duplicates", "dispatched, never ran"):
        assert counts[problem] == 0, result
    # The fence held: the old master refused what came its way and gave its setting back.
    old = next(node for node in sentinel_group.nodes if node.port != sentinel_group.master_port())
    with old.client() as client:
        assert client.config_get("min-replicas-to-write")["min-replicas-to-write"] == "0"


def test_plain_sentinel_failover_with_wait_loses_nothing(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """A plain ``SENTINEL FAILOVER`` with ``REDIS_WAIT_REPLICAS=1``: a write the old master takes
    after the promotion is never confirmed (its replica left it), so every process does it again
    on the new master. The new master has no replica until the old one rejoins; every Sentinel
    names it with no failover under way, so writes go on there without waiting (logged once).
    No acknowledged probe write is lost; every fire is recorded once, dispatched fires ran once
    and their outcome is recorded; the fires due meanwhile are decided within their grace."""
    logs: dict[str, str] = {}
    result, lost, at, promoted, flowing = run_failover(
        lambda group: group.failover(),
        sentinel_group,
        redis_process,
        start_worker,
        start_scheduler,
        tmp_path,
        namespace,
        run_after_s=OLD_MASTER_DEMOTED_S + 4,
        wait=True,
        logs=logs,
    )
    report("SENTINEL FAILOVER with WAIT", result, lost, at, promoted, flowing)
    turned_away = logs["worker"].count("not dispatched (a failover lost its decision)")
    deferred = logs["worker"].count("not confirmed by the replicas yet")
    print(
        f"  worker: {turned_away} deliveries of discarded decisions turned away, {deferred} unconfirmed leases deferred"
    )
    counts = result["counts"]
    assert counts["fires"] >= 20 * 2 * RUN_AFTER_S
    assert lost == [], f"{len(lost)} acknowledged probe writes lost"
    problems = (
        "missed",
        "gaps",
        "unrecorded",
        "duplicates",
        "ran, not dispatched",
        "dispatched, never ran",
        "ran, outcome not recorded",
    )
    assert {p: counts[p] for p in problems} == dict.fromkeys(problems, 0), result
    assert counts["dispatched"] + counts["coalesced"] == counts["fires"], counts
    # Each process said once that writes went on with fewer replicas, and once that the old
    # master, back as a replica, confirms them again.
    for name, log in logs.items():
        assert log.count("redis writes wait for 0 of REDIS_WAIT_REPLICAS=1") <= 2, (name, log[-3000:])
        assert "redis writes confirmed by 1 replicas again" in log, (name, log[-3000:])


def test_sigkill_of_the_master_with_wait_loses_nothing(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """SIGKILL of the master with ``REDIS_WAIT_REPLICAS=1``: a write is acknowledged only once
    the replica has it, so the promoted replica has every acknowledged write. The old master
    never comes back: the new one has no replica, and every Sentinel names it, so writes go
    on without waiting (said once per process). Nothing lost, unrecorded or run twice."""
    logs: dict[str, str] = {}
    result, lost, at, promoted, flowing = run_failover(
        lambda group: group.kill_master()[1],
        sentinel_group,
        redis_process,
        start_worker,
        start_scheduler,
        tmp_path,
        namespace,
        wait=True,
        logs=logs,
    )
    report("SIGKILL with WAIT", result, lost, at, promoted, flowing)
    counts = result["counts"]
    assert counts["fires"] >= 20 * 2 * RUN_AFTER_S
    assert lost == [], f"{len(lost)} acknowledged probe writes lost"
    problems = ("missed", "gaps", "unrecorded", "duplicates", "ran, not dispatched", "dispatched, never ran")
    assert {p: counts[p] for p in problems} == dict.fromkeys(problems, 0), result
    assert counts["coalesced"] >= 20, counts  # the fires due during the failover: one per job
    for name, log in logs.items():
        assert log.count("redis writes wait for 0 of REDIS_WAIT_REPLICAS=1") == 1, (name, log[-3000:])


def test_a_fenced_master_refusing_outcomes_and_acks_costs_no_run_and_no_worker(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """The master refuses writes for 4 s (``min-replicas-to-write`` unmet, as
    ``planned-failover.sh`` fences it before its replica is promoted) while runs end. Each
    run's outcome is tried again until the fence lifts, and a refused ack
    reads as a lost connection, not an error that ended the Celery worker (exit 70): no fire
    runs twice, no outcome is lost, the worker never stops."""
    ledger = redis_process(appendonly=False)
    settings = sentinel_settings(sentinel_group, namespace, False)
    env = fault_env(ledger)
    worker = start_worker(settings, "--pool", "threads", "--concurrency", "8", extra_env=env)
    jobs = [{"id": "r", "task": "faults.ledger", "args": [0.5], "interval": 0.25, "overlap": "allow"}]
    (scheduler,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", jobs), extra_env=env)
    with ledger.client() as ledger_client, sentinel_group.master().client() as master:

        def starts() -> Counter[str]:
            return Counter(e["task_id"] for e in read_ledger(ledger_client) if e["event"] == "start")

        wait_for(lambda: sum(starts().values()) >= 8, 30, "the job to run")
        master.config_set("min-replicas-to-write", 10)  # more replicas than there are: every write refused
        fenced = time.time()
        time.sleep(4)  # the fence (an action, not a wait for a condition)
        master.config_set("min-replicas-to-write", 0)
        ends = [e["ms"] / 1000 for e in read_ledger(ledger_client) if e["event"] == "end"]
        assert any(fenced <= t <= fenced + 0.5 for t in ends), "no run ended early in the fence: it proves nothing"
        assert scheduler.stop() == 0, scheduler.log()[-3000:]
        # A copy of a fire whose outcome was lost comes back once the visibility timeout (10 s)
        # restores its message: none may run twice.
        with pytest.raises(pytest.fail.Exception):
            wait_for(lambda: [t for t, n in starts().items() if n > 1], 15, "a fire to run twice", interval_s=0.5)
        wait_for(lambda: master.hlen("unacked") == 0, 15, "every message acknowledged")
    log = worker.log()
    assert "fire outcome not recorded" not in log, log[-3000:]
    assert "without a shutdown request" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
