"""The worker fleet through Redis restarts (#16): no worker dies, no fire is lost or run twice.

A prefork and a threads worker serve a steady stream of fires while the broker's Redis (with
AOF) is restarted again and again. What ran is counted from a ledger on a second Redis that is
never restarted (``tests/faults/ledger_tasks.py``); what was queued, from the fire hashes in
the broker's Redis, which AOF keeps. The time from Redis answering again to the first task run
is printed (run with ``-s``), never asserted: timings belong in ``bench/``.

The suite restarts Redis 10 times with SHUTDOWN and 3 times with SIGKILL. The long loop (issue
#23: at least 100 restarts) is the same test run by hand with ``FAULTS_REDIS_RESTARTS=N``: N
restarts of each kind per run, e.g.
``FAULTS_REDIS_RESTARTS=25 pytest tests/faults/test_worker_faults.py -k survive_redis_restarts -s``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import pytest
import redis

from scheduler.message import TaskMessage
from shared.celery_app import restore_interval_s
from shared.fleet import Overlap
from shared.settings import AppSettings
from tests.conftest import WorkerProcess, make_settings, wait_for
from tests.faults.harness import RedisProcess, TcpProxy
from tests.faults.ledger_tasks import LEDGER_KEY, read_ledger
from tests.integration.test_worker_fleet import Fleet
from workers.lua import source

pytestmark = pytest.mark.timeout(150)

VISIBILITY_TIMEOUT_S = 10
TIME_LIMIT_S = 5
SLOT_MARGIN_S = 1
JOBS = 50
"""Jobs the load fires, in turn: each keeps the record of its last 100 fires (the ledger's
history limit), which is how the test knows what was queued, so a run may publish 5,000."""
PUBLISH_EVERY_S = 0.1
RESTARTS_ENV = "FAULTS_REDIS_RESTARTS"
RESTART_EVERY_S = (0.5, 1.5)
"""Load between a restart's first task run and the next restart, drawn at random in this range:
the workers' restore sweeps tick every second from their reconnect, which follows the restart
at a nearly fixed delay, so a fixed wait met the same phase of that tick at every restart."""
RESTART_VISIBILITY_S = 6
RESTART_TIME_LIMIT_S = 4
"""The restart loop's instant tasks allow a shorter visibility timeout (above the time limit
plus the slot margin): what a restart left unacknowledged comes back sooner, while Redis is
still being restarted (every 2-3 s), and the loop ends sooner."""


def restarts(suite: int) -> int:
    """The suite's number of restarts, or the long loop's (``FAULTS_REDIS_RESTARTS``)."""
    return int(os.environ.get(RESTARTS_ENV) or suite)


def fault_env(
    ledger: RedisProcess, visibility_s: int = VISIBILITY_TIMEOUT_S, time_limit_s: int = TIME_LIMIT_S
) -> dict[str, str]:
    """What a worker of the fault suite needs beyond its settings: the ledger task, its Redis,
    and a visibility timeout short enough that a message lost in flight comes back in time."""
    return {
        "TASK_MODULES": "tests.faults.ledger_tasks",
        "FAULTS_LEDGER_URL": ledger.url,
        "CELERY_VISIBILITY_TIMEOUT_S": str(visibility_s),
        "CELERY_TASK_TIME_LIMIT_S": str(time_limit_s),
        "SCHEDULER_SLOT_MARGIN_S": str(SLOT_MARGIN_S),
    }


def fault_settings(
    broker: RedisProcess,
    namespace: str,
    url: str | None = None,
    visibility_s: int = VISIBILITY_TIMEOUT_S,
    time_limit_s: int = TIME_LIMIT_S,
) -> AppSettings:
    """The fault suite's settings for ``broker`` (reached at ``url`` when given: a proxy)."""
    return make_settings(
        url or broker.url,
        namespace,
        celery={"visibility_timeout_s": visibility_s, "task_time_limit_s": time_limit_s},
        scheduler={"slot_margin_s": SLOT_MARGIN_S},
    )


@dataclass
class Load:
    """Publishes a fire every :data:`PUBLISH_EVERY_S` over :data:`JOBS` jobs, as the scheduler
    does, from a thread; a publish that fails on a Redis error is simply not counted (its fire
    hash says whether it was queued after all)."""

    fleet: Fleet
    published: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _run(self) -> None:
        minute = 0
        while not self._stop.is_set():
            minute += 1
            try:
                self.fleet.fire(
                    f"load-{minute % JOBS}",
                    "faults.ledger",
                    minute=minute,
                    max_instances=1000,
                    overlap=Overlap.ALLOW,
                    slot_lapse_ms=60_000,
                )
                self.published += 1
            except (redis.RedisError, OSError):
                self.failed += 1
            self._stop.wait(PUBLISH_EVERY_S)


def queued_fires(broker: RedisProcess, settings: AppSettings) -> set[tuple[str, str]]:
    """Every fire the broker's Redis recorded as dispatched: what must run exactly once."""
    prefix = settings.redis.key_prefix
    fires = set()
    with broker.client() as client:
        for key in client.scan_iter(f"{prefix}fire:*", count=1000):
            if client.hget(key, "outcome") == "dispatched":
                job_id, _, scheduled_at = key[len(prefix) + len("fire:") :].partition(":")
                fires.add((job_id, scheduled_at))
    return fires


def where_are(broker: RedisProcess, settings: AppSettings, fires: set[tuple[str, str]]) -> str:
    """Where the messages of fires that never ran are: for a failure message."""
    with broker.client() as client:
        unacked = client.hgetall("unacked")
        index = client.zrange("unacked_index", 0, -1, withscores=True)
        queue = client.lrange(settings.celery.cron_queue, 0, -1)
        lines = [
            f"{len(fires)} fires never ran; queue={len(queue)} unacked={len(unacked)} "
            f"unacked tags={sorted(unacked)} unacked_index={index} now={time.time():.3f} unacked_mutex ttl_ms={client.pttl('unacked_mutex')}"
        ]
        for job_id, scheduled_at in sorted(fires)[:5]:
            state = client.hgetall(settings.redis.key_prefix + f"fire:{job_id}:{scheduled_at}")
            task_id = state.get("task_id", "?")
            lines.append(
                f"{job_id} {scheduled_at}: {state} in_queue={any(task_id in m for m in queue)} "
                f"unacked={any(task_id in m for m in unacked.values())}"
            )
    return "\n".join(lines)


@pytest.mark.parametrize(("count", "kill"), [(restarts(10), False), (restarts(3), True)], ids=["shutdown", "sigkill"])
@pytest.mark.timeout(60 + 8 * restarts(10))
def test_workers_survive_redis_restarts(
    count: int,
    kill: bool,
    redis_process: Callable[..., RedisProcess],
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    broker = redis_process(appendonly=True)
    ledger_server = redis_process(appendonly=False)
    ledger = ledger_server.client()
    settings = fault_settings(broker, namespace, visibility_s=RESTART_VISIBILITY_S, time_limit_s=RESTART_TIME_LIMIT_S)
    env = fault_env(ledger_server, visibility_s=RESTART_VISIBILITY_S, time_limit_s=RESTART_TIME_LIMIT_S)
    workers = [
        start_worker(settings, "-P", "prefork", "-c", "2", name="prefork", extra_env=env),
        start_worker(settings, "-P", "threads", "-c", "4", name="threads", extra_env=env),
    ]
    fleet = Fleet(settings)
    load = Load(fleet).start()
    recovery_ms: list[int] = []
    # The sweep's lock lasts one tick (issue #23): one found after a restart is a sweep's of
    # just before (at most a tick left), never kombu's 300 s kept by the AOF.
    lock_ms = restore_interval_s(RESTART_VISIBILITY_S) * 1000
    try:
        wait_for(lambda: ledger.llen(LEDGER_KEY) >= 10, 30, "the load to run")
        for _ in range(count):
            time.sleep(random.uniform(*RESTART_EVERY_S))
            seen = ledger.llen(LEDGER_KEY)
            broker.restart(kill=kill)
            back_ms = int(time.time() * 1000)
            with broker.client() as client:
                assert client.pttl("unacked_mutex") <= lock_ms

            def ran_since(back_ms: int = back_ms, seen: int = seen) -> int | None:
                entries = [json.loads(item) for item in ledger.lrange(LEDGER_KEY, seen, -1)]
                starts = [e["ms"] for e in entries if e["event"] == "start" and e["ms"] >= back_ms]
                return min(starts) if starts else None

            first_ms = wait_for(ran_since, 60, "a task to run after Redis came back", interval_s=0.05)
            recovery_ms.append(first_ms - back_ms)
        time.sleep(RESTART_EVERY_S[1])
    finally:
        load.stop()

    try:
        expected = queued_fires(broker, settings)
        assert load.published > 0 and len(expected) >= load.published

        def not_run() -> set[tuple[str, str]]:
            return expected - {(e["job_id"], e["scheduled_at"]) for e in read_ledger(ledger) if e["event"] == "start"}

        # A message taken but not acknowledged when Redis went away comes back after the
        # visibility timeout (plus one restore sweep, and a reconnect): it runs, or, when it ran
        # and only its ack was lost, its copy is turned away (and counted below if it ran). So
        # nothing stays unacknowledged (a sweep that never runs leaves it there: issue #23).
        with broker.client() as client:

            def unacked() -> int:
                return int(client.hlen("unacked"))

            deadline = time.monotonic() + RESTART_VISIBILITY_S * 2
            while (not_run() or unacked()) and time.monotonic() < deadline:
                time.sleep(0.5)
            missing = not_run()
            assert not missing, where_are(broker, settings, missing)
            assert unacked() == 0, where_are(broker, settings, set())
        runs = Counter((e["job_id"], e["scheduled_at"]) for e in read_ledger(ledger) if e["event"] == "start")
        duplicates = {fire: n for fire, n in runs.items() if n > 1}
        assert duplicates == {}
        assert set(runs) <= expected  # nothing ran that was not queued

        for worker in workers:
            log = worker.log()
            assert worker.process.poll() is None, f"{worker.hostname} died:\n{log[-3000:]}"
            assert "Unrecoverable error" not in log, log[-3000:]
            assert "Error on restarting" not in log, log[-5000:]
            assert "ended without a shutdown request" not in log, log[-3000:]
        print(
            f"\n{'SIGKILL' if kill else 'SHUTDOWN'} x{count}: fires queued={len(expected)} ran={len(runs)} "
            f"never ran=0 duplicates=0 publish errors={load.failed}; Redis back -> first task run ms: "
            f"median={statistics.median(recovery_ms):.0f} max={max(recovery_ms)} all={recovery_ms}"
        )
    finally:
        fleet.close()
        ledger.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_message_whose_take_reply_is_lost_comes_back_and_runs_once(
    pool: str,
    redis_process: Callable[..., RedisProcess],
    tcp_proxy: Callable[[int], TcpProxy],
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Redis removes a message from its queue for a worker, and the reply carrying it never
    arrives (the connection drops right then: a shutdown, a failover, the network). With kombu's
    BRPOP the message existed nowhere after that; here it comes back after the visibility timeout
    and runs exactly once."""
    broker = redis_process(appendonly=False)
    ledger_server = redis_process(appendonly=False)
    proxy = tcp_proxy(broker.port)
    settings = fault_settings(broker, namespace)
    start_worker(
        fault_settings(broker, namespace, url=proxy.url()), "-P", pool, "-c", "2", extra_env=fault_env(ledger_server)
    )
    fleet = Fleet(settings)
    ledger = ledger_server.client()
    try:
        fleet.fire("warm-up", "faults.ledger")
        wait_for(lambda: read_ledger(ledger), 30, "the worker to run a first fire")
        job_id = f"lost-reply-{namespace}"
        lost = proxy.lose_reply_with(job_id.encode())
        published = fleet.fire(job_id, "faults.ledger", minute=1)
        wait_for(lost.is_set, 15, "the reply that carries the message to be lost")

        def runs() -> list[dict[str, object]]:
            return [e for e in read_ledger(ledger) if e["job_id"] == job_id and e["event"] == "start"]

        fire = {(job_id, published.scheduled_at)}
        deadline = time.monotonic() + VISIBILITY_TIMEOUT_S * 3
        while not runs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runs(), where_are(broker, settings, fire)
        deadline = time.monotonic() + VISIBILITY_TIMEOUT_S + 2  # and once: no second run in another timeout
        while time.monotonic() < deadline:
            assert len(runs()) == 1, runs()
            time.sleep(0.2)
    finally:
        fleet.close()
        ledger.close()


@pytest.mark.parametrize(
    ("marker", "applied", "kill"),
    [(b"BYSCORE", False, False), (b"SET\r\n$13\r\nunacked_mutex", True, True)],
    ids=["sweep-cut-shutdown", "lock-reply-lost-sigkill"],
)
def test_a_restore_sweep_cut_by_a_redis_restart_does_not_hold_back_redelivery(
    marker: bytes,
    applied: bool,
    kill: bool,
    redis_process: Callable[..., RedisProcess],
    tcp_proxy: Callable[[int], TcpProxy],
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Issue #23's loss, made deterministic. A worker's restore sweep locks kombu's
    ``unacked_mutex`` and Redis goes away before the sweep unlocks it: just before the sweep's
    ZRANGE, or right after Redis applied the lock's SET, whose reply is lost. With kombu's 300 s
    lock, the AOF kept the lock through the restart and every sweep of every worker was skipped
    for five minutes: a message taken when Redis went away (its take reply lost) stayed in
    ``unacked`` far past the visibility timeout. It must run, once, within a visibility timeout
    of Redis coming back."""
    broker = redis_process(appendonly=True)
    ledger_server = redis_process(appendonly=False)
    proxy = tcp_proxy(broker.port)
    settings = fault_settings(broker, namespace)
    worker = start_worker(
        fault_settings(broker, namespace, url=proxy.url()),
        "-P",
        "threads",
        "-c",
        "2",
        extra_env=fault_env(ledger_server),
    )
    fleet = Fleet(settings)
    ledger = ledger_server.client()
    try:
        cut = proxy.cut_on_request(marker, applied=applied)
        wait_for(cut.is_set, 15, "the worker's restore sweep to lock the unacked index")
        with broker.client() as client:
            assert client.pttl("unacked_mutex") > 0  # the cut sweep holds it
        broker.restart(kill=kill)  # the AOF keeps the lock
        job_id = f"stranded-{namespace}"
        published = fleet.fire(job_id, "faults.ledger")
        with broker.client() as client:
            # Taken by a worker whose take reply was lost when Redis went away, a visibility
            # timeout ago: the state the take script leaves, which only a sweep hands out again.
            taken_at = time.time() - VISIBILITY_TIMEOUT_S - 1
            args = ("unacked", "unacked_index", published.list_key, f"{taken_at:.6f}", "1")
            assert client.eval(source("take"), 3, *args)
            assert client.pttl("unacked_mutex") > 0  # the restart kept the lock
        back = time.monotonic()
        proxy.restore()

        def runs() -> list[dict[str, object]]:
            return [e for e in read_ledger(ledger) if e["job_id"] == job_id and e["event"] == "start"]

        deadline = back + VISIBILITY_TIMEOUT_S
        while not runs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runs(), where_are(broker, settings, {(job_id, published.scheduled_at)})
        print(f"\nrestored and run {time.monotonic() - back:.1f}s after Redis came back")
        with broker.client() as client:
            wait_for(lambda: client.hlen("unacked") == 0, 10, "the run to be acknowledged")
        assert len(runs()) == 1
        # The reconnect stopped the consumer's steps on a dead connection: quietly (issue #23).
        log = worker.log()
        assert "Connection to broker lost" in log, log[-3000:]
        assert "Error on restarting" not in log, log[-5000:]
    finally:
        fleet.close()
        ledger.close()


def test_a_worker_drains_its_queue_while_redis_is_at_maxmemory(
    redis_process: Callable[..., RedisProcess], namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A noeviction Redis at maxmemory refuses the take's doorbell (BLMOVE may grow memory),
    not the take itself (its first write is a pop): the worker still empties its queue, which is
    how such a server gets memory back. (The task stores no result: Celery's result backend on
    the same server is refused too, and a task whose STARTED state cannot be stored is never
    acknowledged.)"""
    broker = redis_process(appendonly=False, extra_args=("--maxmemory-policy", "noeviction"))
    ledger_server = redis_process(appendonly=False)
    settings = fault_settings(broker, namespace)
    worker = start_worker(settings, "-P", "threads", "-c", "4", extra_env=fault_env(ledger_server))
    fleet = Fleet(settings)
    ledger = ledger_server.client()
    count = 300
    queue = settings.celery.cron_queue
    try:
        batch = [TaskMessage("faults.ledger_no_result", [], {}, queue, f"oom-{i}", {}) for i in range(count)]
        with broker.client() as client:
            client.lpush(f"{queue}-staging", *[payload for _, payload in fleet.publisher.encode(batch)])
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", str(used // 2))  # at maxmemory until long after the drain
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set(f"{namespace}:probe", "x")
            client.rename(f"{queue}-staging", queue)  # all at once, under the worker's doorbell

            def started() -> int:
                return sum(1 for e in read_ledger(ledger) if e["event"] == "start" and e["task_id"].startswith("oom-"))

            wait_for(lambda: started() == count, 90, f"{count} tasks to run at maxmemory")
            assert client.llen(queue) == 0
            with pytest.raises(redis.exceptions.OutOfMemoryError):  # still at maxmemory: the point
                client.set(f"{namespace}:probe", "x")
        wait_for(lambda: "Redis is at maxmemory: the worker polls its queues" in worker.log(), 10, "the warning")
        assert worker.process.poll() is None
    finally:
        fleet.close()
        ledger.close()


@pytest.mark.parametrize("gone", ["while-running", "before-start"])
def test_a_fire_whose_result_cannot_be_stored_is_recorded_succeeded_and_runs_once(
    gone: str, redis_process: Callable[..., RedisProcess], namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """The result backend's Redis goes away while the body runs, or before it starts: the body
    runs once and the fire is recorded succeeded. While running, it stayed "running" before, and
    once its run lease lapsed the message, unacknowledged, ran a second time; before the start,
    the STARTED state could not be stored, which failed the fire without running it."""
    broker = redis_process(appendonly=False)
    ledger_server = redis_process(appendonly=False)
    results = redis_process(appendonly=False)
    settings = fault_settings(broker, namespace)
    env = {**fault_env(ledger_server), "CELERY_RESULT_BACKEND": results.url}
    worker = start_worker(settings, "-P", "threads", "-c", "2", extra_env=env)
    fleet = Fleet(settings)
    ledger = ledger_server.client()
    try:
        if gone == "before-start":
            results.stop()
        fire = fleet.fire(f"no-result-{namespace}", "faults.ledger", kwargs={"seconds": 1.0})
        key = f"{settings.redis.key_prefix}fire:{fire.job_id}:{fire.scheduled_at}"
        wait_for(lambda: read_ledger(ledger), 30, "the task to start")
        if gone == "while-running":
            results.stop()  # its result cannot be stored
        wait_for(lambda: "Exception raised outside body" in worker.log(), 60, "Celery to fail storing the result")
        wait_for(lambda: fleet.redis.hget(key, "run") not in (None, "running"), 10, "the fire's outcome")
        assert fleet.redis.hget(key, "run") == "succeeded", fleet.redis.hgetall(key)
        # Unacknowledged, the message comes back after the visibility timeout, and is turned away.
        wait_for(lambda: "the fire already succeeded" in worker.log(), VISIBILITY_TIMEOUT_S * 3, "the copy")
        assert [e["event"] for e in read_ledger(ledger) if e["job_id"] == fire.job_id] == ["start", "end"]
    finally:
        fleet.close()
        ledger.close()


def test_an_outcome_that_redis_refuses_past_one_call_is_tried_again_and_the_fire_runs_once(
    redis_process: Callable[..., RedisProcess],
    tcp_proxy: Callable[[int], TcpProxy],
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Redis cannot be reached for 8 s from the moment a run's outcome is sent (a failover, a
    restart). One redis-py call gives up after about 4-5 s of its own retries; the outcome is
    tried again for half the visibility timeout (15 s here), so it is recorded once Redis is back
    and the fire runs once. With a fixed 3 s budget it was given up after that first call, and
    the fire stayed "running" while its restored message came back to run it again."""
    broker = redis_process(appendonly=False)
    ledger_server = redis_process(appendonly=False)
    proxy = tcp_proxy(broker.port)
    visibility_s = 30  # the outcome's budget: 15 s, three redis-py calls or more
    settings = fault_settings(broker, namespace, visibility_s=visibility_s)
    worker = start_worker(
        fault_settings(broker, namespace, url=proxy.url(), visibility_s=visibility_s),
        *("-P", "threads", "-c", "2"),
        extra_env=fault_env(ledger_server, visibility_s=visibility_s),
    )
    fleet = Fleet(settings)
    ledger = ledger_server.client()
    try:
        warm_up = fleet.fire("warm-up", "faults.ledger")
        wait_for(lambda: fleet.run_of(warm_up).get("run") == "succeeded", 30, "a first fire's outcome")
        fire = fleet.fire(f"refused-{namespace}", "faults.ledger", kwargs={"seconds": 1.0}, minute=1)
        # The finish script's arguments: ..., task id, outcome (not the run's start, nor an event).
        cut = proxy.cut_on_request(f"{fire.task_id}\r\n$9\r\nsucceeded".encode())
        wait_for(cut.is_set, 30, "the outcome's write to be cut")
        time.sleep(8)  # Redis out of reach (an action, not a wait for a condition)
        proxy.restore()
        wait_for(lambda: fleet.run_of(fire).get("run") not in (None, "running"), 15, "the fire's outcome")
        assert fleet.run_of(fire)["run"] == "succeeded", fleet.run_of(fire)
        # The connection's loss put its message back (Celery restores what it holds): it comes
        # back and is turned away. Once nothing is unacknowledged, the fire ran once.
        wait_for(lambda: fleet.redis.hlen("unacked") == 0, 30, "every message acknowledged")
        assert [e["event"] for e in read_ledger(ledger) if e["job_id"] == fire.job_id] == ["start", "end"]
        assert "fire outcome not recorded" not in worker.log(), worker.log()[-3000:]
    finally:
        fleet.close()
        ledger.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_whose_broadcast_connection_is_killed_goes_on_consuming(
    pool: str, redis_process: Callable[..., RedisProcess], namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Redis drops the worker's pub/sub connection (broadcast queues: remote control), as a
    restarted server does. redis-py reconnected it inside kombu's read and then waited for a
    broadcast that never came, so the worker's event loop hung and its queue filled up (seen
    after a SIGKILL of Redis: 393 messages waiting, both workers silent). It must come back."""
    broker = redis_process(appendonly=False)
    ledger_server = redis_process(appendonly=False)
    settings = fault_settings(broker, namespace)
    worker = start_worker(settings, "-P", pool, "-c", "2", extra_env=fault_env(ledger_server))
    fleet = Fleet(settings)
    ledger = ledger_server.client()
    try:
        fleet.fire("before", "faults.ledger")
        wait_for(lambda: read_ledger(ledger), 30, "a first fire to run")
        with broker.client() as client:
            assert client.client_kill_filter(_type="pubsub") >= 1
        fleet.fire("after", "faults.ledger", minute=1)
        wait_for(lambda: any(e["job_id"] == "after" for e in read_ledger(ledger)), 30, "a fire after the kill to run")
        assert worker.process.poll() is None
    finally:
        fleet.close()
        ledger.close()


def test_what_a_no_ack_consumer_takes_is_not_left_unacknowledged(
    redis_process: Callable[..., RedisProcess], namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A second worker's start-up asks the first one over remote control (mingle) and reads the
    reply from a reply queue it consumes without acknowledging: the take must not record that
    reply, or it would sit in the unacked index and come back after the visibility timeout."""
    broker = redis_process(appendonly=False)
    ledger_server = redis_process(appendonly=False)
    settings = fault_settings(broker, namespace)
    start_worker(settings, "-P", "threads", "-c", "1", extra_env=fault_env(ledger_server))
    second = start_worker(settings, "-P", "threads", "-c", "1", extra_env=fault_env(ledger_server))
    assert "mingle: sync with 1 nodes" in second.log()  # it read the first worker's reply
    with broker.client() as client:
        assert client.hlen("unacked") == 0, client.hgetall("unacked")


def test_supervisor_restarts_a_killed_celery_worker_and_stops_on_sigterm(
    redis_process: Callable[..., RedisProcess], namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    broker = redis_process(appendonly=True)
    ledger_server = redis_process(appendonly=False)
    settings = fault_settings(broker, namespace)
    worker = start_worker(settings, "-P", "threads", "-c", "2", extra_env=fault_env(ledger_server))
    [celery] = psutil.Process(worker.process.pid).children()
    os.kill(celery.pid, signal.SIGKILL)  # the Celery worker dies unasked

    wait_for(lambda: worker.log().count(f"worker ready hostname={worker.hostname}") == 2, 30, "a restarted worker")
    assert "ended without a shutdown request (exit status -9): restarting it" in worker.log()
    [restarted] = psutil.Process(worker.process.pid).children()
    fleet = Fleet(settings)
    try:
        fleet.fire("after-restart", "faults.ledger")
        with ledger_server.client() as ledger:
            wait_for(lambda: read_ledger(ledger), 20, "the restarted worker to run a fire")
    finally:
        fleet.close()
    assert worker.stop() == 0  # SIGTERM to the supervisor: a warm shutdown, exit 0
    assert not restarted.is_running() or restarted.status() == psutil.STATUS_ZOMBIE


def test_supervisor_gives_up_with_a_non_zero_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import supervisor

    monkeypatch.setattr(supervisor, "BACKOFF_FIRST_S", 0.05)
    dies = [sys.executable, "-c", "import sys; sys.exit(0)"]  # ends unasked, even with status 0
    assert supervisor.supervise(dies) == supervisor.EX_SOFTWARE
    assert supervisor.supervise([sys.executable, "-c", "import sys; sys.exit(78)"]) == 78


def test_a_result_stored_while_its_redis_is_away_is_retried_and_the_fire_runs(
    redis_process: Callable[..., RedisProcess],
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """The lease is taken, then STARTED cannot be stored (the result backend's Redis is away):
    Celery's Redis backend retries the store (20 tries, up to 1 s apart) and the task runs,
    instead of the fire being recorded failed with a ConnectionError and its body never run."""
    broker = redis_process(appendonly=True)
    results = redis_process(appendonly=False)
    ledger_server = redis_process(appendonly=False)
    ledger = ledger_server.client()
    settings = make_settings(
        broker.url,
        namespace,
        celery={
            "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
            "task_time_limit_s": TIME_LIMIT_S,
            "result_backend": results.url,
        },
        scheduler={"slot_margin_s": SLOT_MARGIN_S},
    )
    start_worker(settings, "-P", "threads", "-c", "2", extra_env=fault_env(ledger_server))
    fleet = Fleet(settings)
    try:
        results.stop()
        fire = fleet.fire("away", "faults.ledger")
        record_key = f"{settings.redis.key_prefix}fire:{fire.job_id}:{fire.scheduled_at}"
        with broker.client() as client:
            wait_for(lambda: client.hget(record_key, "started_ms"), 30, "the worker to take the run lease")
            results.start()
            wait_for(
                lambda: any(e["event"] == "end" for e in read_ledger(ledger)), 30, "the task to run once Redis is back"
            )
            record = wait_for(
                lambda: client.hgetall(record_key) if client.hget(record_key, "run") else None, 30, "its outcome"
            )
        assert record["run"] == "succeeded", record
        assert [e["event"] for e in read_ledger(ledger)] == ["start", "end"]
    finally:
        fleet.close()
