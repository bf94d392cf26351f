"""``WAIT``-based durability (``REDIS_WAIT_REPLICAS``, shared/durability.py) with real processes:
Debian's ``redis-server`` as master and replica, ``redis-sentinel``, schedulers and workers.

- the clients: every kind of write (command, script, pipeline, transaction; blocking and
  asyncio) is confirmed while the replica keeps up, and refused (``NotReplicatedError``, a
  connection error) while it does not; reads are never held up;
- the only replica down under load, with Sentinel: writes go on without it (every Sentinel
  names the master, no failover under way), reported once per process, and confirmed again
  once it is back; nothing lost, late or doubled;
- the only replica down without Sentinel (nobody can rule out a failover): writes stall and
  are retried, the scheduler lives on and says so once, and the fires due meanwhile are
  decided when the replica is back, within their grace, one per job (coalesce).

Fires are counted per nominal time from the fire records and the ledger
(tests/faults/test_sentinel_failover.py's ``account``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from shared.errors import NotReplicatedError
from shared.redis import create_async_redis, create_redis
from shared.settings import AppSettings
from tests.conftest import SchedulerProcess, WorkerProcess, make_settings, wait_for, write_jobs
from tests.faults.harness import RedisProcess
from tests.faults.ledger_tasks import read_ledger
from tests.faults.sentinel_harness import DEBIAN_REDIS_SERVER, SentinelGroup, require_debian_redis
from tests.faults.test_sentinel_failover import JOBS, WAIT_ENV, WAIT_TIMEOUT_MS, account, epoch, sentinel_settings
from tests.faults.test_worker_faults import SLOT_MARGIN_S, TIME_LIMIT_S, VISIBILITY_TIMEOUT_S, fault_env

pytestmark = pytest.mark.timeout(120)

DEGRADED = "redis writes wait for 0 of REDIS_WAIT_REPLICAS=1 replicas"
SHORT = "redis writes not confirmed by REDIS_WAIT_REPLICAS=1 replicas"
CONFIRMED = "redis writes confirmed by 1 replicas again"
PROBLEMS = ("missed", "gaps", "unrecorded", "duplicates", "ran, not dispatched", "dispatched, never ran")


def master_and_replica(redis_process: Callable[..., RedisProcess]) -> tuple[RedisProcess, RedisProcess]:
    require_debian_redis()
    master = redis_process(appendonly=False, binary=DEBIAN_REDIS_SERVER, extra_args=("--repl-diskless-sync-delay", "0"))
    replica = redis_process(
        appendonly=False, binary=DEBIAN_REDIS_SERVER, extra_args=("--replicaof", "127.0.0.1", str(master.port))
    )
    wait_for(lambda: in_sync(master), 15, "the replica to sync")
    return master, replica


def in_sync(master: RedisProcess) -> bool:
    """Whether the master lists a replica as online (synced, acknowledging)."""
    try:
        with master.client() as client:
            return len(client.execute_command("ROLE")[2]) > 0
    except (redis.RedisError, OSError):
        return False


def waiting_settings(master: RedisProcess, namespace: str, wait_timeout_ms: int = WAIT_TIMEOUT_MS) -> AppSettings:
    return make_settings(
        master.url,
        namespace,
        redis={"wait_replicas": 1, "wait_timeout_ms": wait_timeout_ms, "socket_timeout_s": 2},
        celery={"visibility_timeout_s": VISIBILITY_TIMEOUT_S, "task_time_limit_s": TIME_LIMIT_S},
        scheduler={"slot_margin_s": SLOT_MARGIN_S},
    )


def test_every_kind_of_write_waits_for_the_replica(redis_process: Callable[..., RedisProcess], namespace: str) -> None:
    master, replica = master_and_replica(redis_process)
    # A replica starved of CPU (a loaded test machine) can take longer than 200 ms to acknowledge.
    settings = waiting_settings(master, namespace, wait_timeout_ms=1500)
    client = create_redis(settings.redis)
    incr = client.register_script("return redis.call('INCR', KEYS[1])")

    def sync_writes() -> list[object]:
        with client.pipeline(transaction=False) as pipe:
            pipe.set(f"{namespace}:p", 1)
            pipe.get(f"{namespace}:p")
            piped = pipe.execute()
        with client.pipeline(transaction=True) as pipe:
            pipe.incr(f"{namespace}:t")
            pipe.incr(f"{namespace}:t")
            transacted = pipe.execute()
        return [client.set(f"{namespace}:s", "v"), incr(keys=[f"{namespace}:n"]), piped, transacted]

    async def async_writes() -> list[object]:
        aclient = create_async_redis(settings.redis)
        try:
            ascript = aclient.register_script("return redis.call('INCR', KEYS[1])")
            async with aclient.pipeline(transaction=False) as pipe:
                pipe.set(f"{namespace}:ap", 1)
                piped = await pipe.execute()
            async with aclient.pipeline(transaction=True) as pipe:
                pipe.incr(f"{namespace}:at")
                transacted = await pipe.execute()
            return [
                await aclient.set(f"{namespace}:as", "v"),
                await ascript(keys=[f"{namespace}:an"]),
                piped,
                transacted,
            ]
        finally:
            await aclient.aclose()

    try:
        assert sync_writes() == [True, 1, [True, "1"], [1, 2]]
        assert asyncio.run(async_writes()) == [True, 1, [True], [1]]
        with replica.client() as replica_client:  # confirmed means the replica has it
            assert replica_client.get(f"{namespace}:s") == "v"
        replica.freeze()  # connected, but acknowledges nothing
        writes: list[tuple[str, Callable[[], object]]] = [
            ("set", lambda: client.set(f"{namespace}:s", "w")),
            ("script", lambda: incr(keys=[f"{namespace}:n"])),
            ("pipeline", sync_writes),
            ("async", lambda: asyncio.run(async_writes())),
        ]
        for name, write in writes:
            started = time.monotonic()
            with pytest.raises(NotReplicatedError, match=r"confirmed by 0 of 1 replicas within 1500 ms"):
                write()
            assert time.monotonic() - started < 15, name
        assert client.get(f"{namespace}:s") == "w"  # reads are not held up (and see the master)
        replica.thaw()
        wait_for(lambda: client.set(f"{namespace}:s", "x"), 10, "writes to be confirmed again")
    finally:
        replica.thaw()
        client.close()


def fresh_run(ledger_client: redis.Redis, after: float) -> float | None:
    """When the first run of a fire due after ``after`` (epoch s) started, if one has."""
    starts = [e for e in read_ledger(ledger_client) if e["event"] == "start" and epoch(e["scheduled_at"]) > after]
    return min(e["ms"] for e in starts) / 1000 if starts else None


def test_the_only_replica_down_with_sentinel(
    sentinel_group: SentinelGroup,
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """SIGKILL the replica under load with ``REDIS_WAIT_REPLICAS=1``: after one write's wait
    (``REDIS_WAIT_TIMEOUT_MS``) every process writes on without it, since every Sentinel names the
    master and none fails it over; each says so once. The replica restarts, resyncs, and writes
    are confirmed by it again. No fire is missed, lost, unrecorded or run twice (the lateness
    of the first fires after the kill is printed)."""
    ledger = redis_process(appendonly=False)
    settings = sentinel_settings(sentinel_group, namespace, wait=True)
    env = {**fault_env(ledger), **WAIT_ENV}
    worker = start_worker(settings, "--pool", "threads", "--concurrency", "8", extra_env=env)
    (scheduler,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS), extra_env=env)
    master = sentinel_group.master()
    with ledger.client() as ledger_client:
        wait_for(lambda: len(read_ledger(ledger_client)) >= 80, 30, "the jobs to run")
        began = time.time()
        replica = sentinel_group.replica()
        replica.kill()
        killed = time.time()
        flowing = wait_for(lambda: fresh_run(ledger_client, killed + 0.5), 15, "fires to run without the replica")
        wait_for(lambda: DEGRADED in scheduler.log() and DEGRADED in worker.log(), 15, "both to report it")
        runs = len(read_ledger(ledger_client))
        wait_for(lambda: len(read_ledger(ledger_client)) >= runs + 80, 30, "the jobs to run on")
        replica.start()
        wait_for(lambda: CONFIRMED in scheduler.log() and CONFIRMED in worker.log(), 30, "writes confirmed again")
    assert scheduler.stop() == 0, scheduler.log()[-3000:]
    with master.client() as client:
        wait_for(
            lambda: client.llen(settings.celery.cron_queue) == 0 and client.hlen("unacked") == 0,
            30,
            "the worker to take, run and acknowledge the queued fires",
        )
    result = account(master, ledger, settings, began)
    counts = result["counts"]
    print(
        f"\nreplica down with WAIT: a fire due 0.5 s after the kill ran {flowing - killed - 0.5:.2f} s late; {counts}"
    )
    assert {p: counts[p] for p in PROBLEMS} == dict.fromkeys(PROBLEMS, 0), result
    for name, log in (("scheduler", scheduler.log()), ("worker", worker.log())):
        assert log.count(DEGRADED) == 1, (name, log[-3000:])  # once per outage, not per write
        assert log.count(CONFIRMED) == 1, (name, log[-3000:])


def test_the_only_replica_down_without_sentinel_stalls_writes(
    redis_process: Callable[..., RedisProcess],
    start_worker: Callable[..., WorkerProcess],
    start_scheduler: Callable[..., list[SchedulerProcess]],
    tmp_path: Path,
    namespace: str,
) -> None:
    """Without Sentinel nothing can rule out that the replica was promoted: with the only
    replica down every write is retried until it is back. The scheduler does not crash and
    reports it once; the fires due meanwhile are decided once it is back, within their grace,
    coalesced into one per job; nothing is lost or run twice."""
    master, replica = master_and_replica(redis_process)
    ledger = redis_process(appendonly=False)
    settings = waiting_settings(master, namespace)
    env = {**fault_env(ledger), **WAIT_ENV}
    worker = start_worker(settings, "--pool", "threads", "--concurrency", "8", extra_env=env)
    (scheduler,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS), extra_env=env)
    with ledger.client() as ledger_client:
        wait_for(lambda: len(read_ledger(ledger_client)) >= 80, 30, "the jobs to run")
        began = time.time()
        replica.kill()
        wait_for(lambda: SHORT in scheduler.log(), 15, "the scheduler to report the missing replica")
        # A bounded wait that must run out: no fire due after the kill runs while it is down
        # (its decision, or its run lease, is not confirmed).
        down_until = time.monotonic() + 4
        while time.monotonic() < down_until:
            assert fresh_run(ledger_client, began + 1.0) is None, "a fire ran on an unconfirmed write"
            time.sleep(0.1)
        assert scheduler.process.poll() is None, scheduler.log()[-3000:]
        replica.start()
        back = time.time()
        flowing = wait_for(lambda: fresh_run(ledger_client, began + 1.0), 30, "fires to run again")
        wait_for(lambda: time.time() > back + 4, 5, "the fleet to run on")
    assert scheduler.stop() == 0, scheduler.log()[-3000:]
    with master.client() as client:
        wait_for(
            lambda: client.llen(settings.celery.cron_queue) == 0 and client.hlen("unacked") == 0,
            30,
            "the worker to take, run and acknowledge the queued fires",
        )
    result = account(master, ledger, settings, began)
    counts = result["counts"]
    print(f"\nreplica down without Sentinel: fires ran again {flowing - back:.2f} s after it was back; {counts}")
    assert {p: counts[p] for p in PROBLEMS} == dict.fromkeys(PROBLEMS, 0), result
    assert counts["coalesced"] >= len(JOBS), counts  # the outage's fires: one dispatched per job
    log = scheduler.log()
    assert log.count(SHORT) == 1, log[-3000:]
    assert log.count("dispatch failed") <= 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert CONFIRMED in log and CONFIRMED in worker.log()
