"""The worker side of the fleet: run lease, outcomes, heartbeat, against real workers.

Fires are published the way the scheduler publishes them (``BatchPublisher.encode`` then
``FireLedger.decide``); what the workers executed is read from the list ``demo.record_fire``
appends to.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import psutil
import pytest

from scheduler.message import TaskMessage
from scheduler.publishing import BatchPublisher
from shared.celery_app import create_celery_app
from shared.fleet import FireIntent, FireLedger, Outcome, Overlap
from shared.names import RedisKeys, fire_task_id, format_scheduled_at
from shared.redis import create_redis
from shared.settings import AppSettings
from tests.conftest import RedisServer, WorkerProcess, make_settings, wait_for

pytestmark = pytest.mark.timeout(120)

BASE_TIME = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Published:
    job_id: str
    scheduled_at: str
    task_id: str
    list_key: str
    payload: str
    outcome: str


class Fleet:
    """Publishes fires as the scheduler does and reads what the workers made of them."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.redis = create_redis(settings.redis)
        self.ledger = FireLedger(self.redis, self.keys)
        self.app = create_celery_app(settings)
        self.publisher = BatchPublisher(self.app, lambda: create_redis(settings.redis))

    def close(self) -> None:
        self.publisher.close()
        self.app.close()
        self.redis.close()

    def fire(
        self,
        job_id: str,
        task: str = "demo.record_fire",
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        minute: int = 0,
        max_instances: int = 1,
        overlap: Overlap = Overlap.SKIP,
        slot_lapse_ms: int = 120_000,
        time_limit_s: int | None = None,
        expires_s: float | None = None,
    ) -> Published:
        when = BASE_TIME + timedelta(minutes=minute)
        scheduled_at = format_scheduled_at(when)
        task_id = fire_task_id(job_id, when)
        message = TaskMessage(
            task_name=task,
            args=args or [],
            kwargs=kwargs or {},
            queue=self.settings.celery.cron_queue,
            task_id=task_id,
            headers={"job_id": job_id, "scheduled_at": scheduled_at, "trace_id": task_id},
            time_limit_s=time_limit_s,
            expires_s=expires_s,
        )
        [(list_key, payload)] = self.publisher.encode([message])
        intent = FireIntent(
            job_id,
            scheduled_at,
            task_id,
            Outcome.DISPATCHED,
            max_instances=max_instances,
            overlap=overlap,
            slot_lapse_ms=slot_lapse_ms,
            list_key=list_key,
            payload=payload,
        )
        [outcome] = self.ledger.decide([intent], owner="test")
        return Published(job_id, scheduled_at, task_id, list_key, payload, str(outcome))

    def executions(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.redis.lrange(self.keys.key("executions"), 0, -1)]

    def run_of(self, fire: Published) -> dict[str, str]:
        raw = self.redis.hgetall(self.keys.fire(fire.job_id, fire.scheduled_at))
        return {str(key): str(value) for key, value in raw.items()}

    def run_is(self, fire: Published, run: str) -> dict[str, str] | None:
        state = self.run_of(fire)
        return state if state.get("run") == run else None

    def slots(self, job_id: str) -> int:
        return int(self.redis.zcard(self.keys.inflight(job_id)))


@pytest.fixture
def fleet(settings: AppSettings) -> Iterator[Fleet]:
    fleet = Fleet(settings)
    yield fleet
    fleet.close()


def never(predicate: Callable[[], Any], within_s: float) -> None:
    """Fail if ``predicate`` becomes true within ``within_s`` (a bounded wait that must time out)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert not predicate()
        time.sleep(0.05)


def logged(*workers: WorkerProcess, text: str) -> bool:
    return any(text in worker.log() for worker in workers)


def turned_away(worker: WorkerProcess, job_id: str) -> bool:
    """A duplicate delivery was not run: skipped (the fire had succeeded) or deferred (it was
    running)."""
    return any(logged(worker, text=f"duplicate delivery {how} job_id={job_id} ") for how in ("skipped", "deferred"))


def test_fire_runs_once_and_its_run_is_recorded(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(fleet.settings, "-P", "threads", "-c", "2")
    fire = fleet.fire("once", kwargs={"seconds": 0.2})
    assert fire.outcome == "dispatched"
    assert fleet.slots("once") == 1

    state = wait_for(lambda: fleet.run_is(fire, "succeeded"), 15, "the fire to succeed")
    assert state["worker"] == worker.hostname
    assert state["runner"].startswith(f"{worker.hostname}:")
    assert state["attempts"] == "1"
    assert int(state["finished_ms"]) >= int(state["started_ms"])
    assert int(state["duration_ms"]) >= 200
    assert "run_lease_ms" not in state
    assert fleet.slots("once") == 0
    [execution] = fleet.executions()
    assert (execution["job_id"], execution["scheduled_at"], execution["task_id"]) == (
        "once",
        fire.scheduled_at,
        fire.task_id,
    )
    assert fleet.redis.hget(fleet.keys.counters, "succeeded") == "1"


def test_duplicate_publish_executes_once(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(fleet.settings, "-P", "prefork", "-c", "2")
    fire = fleet.fire("dup", kwargs={"seconds": 0.2})
    async_fire = fleet.fire("dup-async", "demo.async_sleep", [0.2])
    for published in (fire, async_fire):
        fleet.redis.lpush(published.list_key, published.payload)  # the same message a second time

    wait_for(lambda: fleet.run_is(fire, "succeeded"), 15, "the fire to succeed")
    wait_for(lambda: fleet.run_is(async_fire, "succeeded"), 15, "the async fire to succeed")
    for job_id in ("dup", "dup-async"):
        wait_for(partial(turned_away, worker, job_id), 15, f"the duplicate of {job_id} to be turned away")
    never(lambda: len(fleet.executions()) > 1, 1.5)
    assert fleet.run_of(fire)["attempts"] == fleet.run_of(async_fire)["attempts"] == "1"
    assert fleet.redis.llen(fire.list_key) == 0

    # One more copy each, now that the runs are over: skipped, and the results stay the runs'.
    def skips(job_id: str) -> int:
        return worker.log().count(f"duplicate delivery skipped job_id={job_id} ")

    before = {job_id: skips(job_id) for job_id in ("dup", "dup-async")}
    for published in (fire, async_fire):
        fleet.redis.lpush(published.list_key, published.payload)
    for job_id, count in before.items():
        wait_for(lambda job_id=job_id, count=count: skips(job_id) > count, 15, f"the late copy of {job_id} skipped")  # type: ignore[misc]
    never(lambda: len(fleet.executions()) > 1, 1.0)
    for published, value in ((fire, None), (async_fire, {"slept": 0.2})):
        result = fleet.app.AsyncResult(published.task_id)
        assert result.state == "SUCCESS", (result.state, result.result)
        if value is not None:
            assert result.result["slept"] == 0.2, result.result


def test_never_two_at_the_same_time(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    first = start_worker(fleet.settings, "-P", "threads", "-c", "1", name="a")
    second = start_worker(fleet.settings, "-P", "threads", "-c", "1", name="b")
    fire = fleet.fire("overlap", kwargs={"seconds": 3})
    [running] = wait_for(fleet.executions, 15, "the first run to start")
    fleet.redis.lpush(fire.list_key, fire.payload)  # a duplicate while it runs

    holder = f"holder={running['worker']}:{running['pid']}"
    wait_for(
        lambda: logged(first, second, text=f"duplicate delivery deferred job_id=overlap {holder}"),
        10,
        "the duplicate to be deferred while the first run holds the lease",
    )
    assert fleet.run_of(fire)["run"] == "running"
    # Celery's result is still the running attempt's STARTED: the duplicate stored nothing
    # (Celery's own task_track_started would have stored its STARTED over it).
    started = fleet.app.AsyncResult(fire.task_id)
    assert started.state == "STARTED"
    assert (started.info["hostname"], str(started.info["pid"])) == (running["worker"], str(running["pid"]))
    wait_for(lambda: fleet.run_is(fire, "succeeded"), 15, "the first run to succeed")
    never(lambda: len(fleet.executions()) > 1, 1.0)


def test_worker_killed_mid_task_frees_the_slot_and_runs_again_after_visibility_timeout(
    redis_server: RedisServer, namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    settings = make_settings(
        redis_server.url,
        namespace,
        celery={"visibility_timeout_s": 8, "task_time_limit_s": 6},
        scheduler={"slot_margin_s": 1},
    )
    env = {"CELERY_VISIBILITY_TIMEOUT_S": "8", "CELERY_TASK_TIME_LIMIT_S": "6", "SCHEDULER_SLOT_MARGIN_S": "1"}
    fleet = Fleet(settings)
    try:
        doomed = start_worker(settings, "-P", "prefork", "-c", "1", name="doomed", extra_env=env)
        fire = fleet.fire("crash", kwargs={"seconds": 30}, time_limit_s=4)
        [first] = wait_for(fleet.executions, 15, "the first run to start")
        os.killpg(doomed.process.pid, signal.SIGKILL)
        doomed.process.wait(10)
        killed_ms = int(time.time() * 1000)
        assert fleet.slots("crash") == 1

        # Nobody reports back: the slot lapses 4 s (time limit) + 1 s (margin) after the start.
        def slot_freed() -> bool:
            fleet.ledger.release(["crash"])
            return fleet.slots("crash") == 0

        wait_for(slot_freed, 10, "the dead run's slot to lapse", interval_s=0.2)
        freed_ms = int(time.time() * 1000)
        assert freed_ms - first["started_ms"] >= 4_500
        assert fleet.run_of(fire)["run"] == "running"  # lapsed, not finished

        # kombu restores an unacked message once it is older than the visibility timeout, when a
        # consumer starts (and on a slow periodic sweep): start the new worker after that.
        tag = json.loads(fire.payload)["properties"]["delivery_tag"]
        delivered_at = float(fleet.redis.zscore("unacked_index", tag) or 0)
        assert delivered_at
        wait_for(lambda: time.time() > delivered_at + 8.5, 15, "the visibility timeout to pass", interval_s=0.2)
        survivor = start_worker(settings, "-P", "prefork", "-c", "1", name="survivor", extra_env=env)

        wait_for(lambda: len(fleet.executions()) == 2, 20, "the fire to run once more")
        second = fleet.executions()[1]
        assert second["worker"] == survivor.hostname
        assert second["task_id"] == fire.task_id
        assert second["started_ms"] > killed_ms  # never overlapping
        # The second attempt runs into its 4 s hard limit: recorded, slot freed, not run again.
        state = wait_for(lambda: fleet.run_is(fire, "failed"), 15, "the second attempt to hit its time limit")
        assert state["error"].startswith("TimeLimitExceeded")
        assert state["attempts"] == "2"
        assert state["worker"] == survivor.hostname
        assert fleet.slots("crash") == 0
        never(lambda: len(fleet.executions()) > 2, 1.0)
    finally:
        fleet.close()


def test_killed_pool_process_is_taken_over_at_once(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(fleet.settings, "-P", "prefork", "-c", "1")
    fire = fleet.fire("child", kwargs={"seconds": 2})
    [first] = wait_for(fleet.executions, 15, "the first run to start")
    os.kill(first["pid"], signal.SIGKILL)

    wait_for(lambda: len(fleet.executions()) == 2, 15, "the re-queued message to run again")
    second = fleet.executions()[1]
    assert second["worker"] == worker.hostname
    assert second["pid"] != first["pid"]
    assert "run lease taken over job_id=child" in worker.log()
    state = wait_for(lambda: fleet.run_is(fire, "succeeded"), 15, "the second run to succeed")
    assert state["attempts"] == "2"
    assert fleet.slots("child") == 0


def test_buffer_one_runs_the_waiting_fire_when_the_slot_frees(
    fleet: Fleet, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(fleet.settings, "-P", "threads", "-c", "2")
    options: dict[str, Any] = {"max_instances": 1, "overlap": Overlap.BUFFER_ONE, "kwargs": {"seconds": 2}}
    first = fleet.fire("buffered", **options)
    wait_for(fleet.executions, 15, "the first fire to start")
    second = fleet.fire("buffered", minute=1, **options)
    assert (first.outcome, second.outcome) == ("dispatched", "buffered")
    assert fleet.redis.exists(fleet.keys.buffer("buffered"))

    wait_for(lambda: fleet.run_is(second, "succeeded"), 20, "the buffered fire to run after the first")
    assert fleet.run_of(first)["run"] == "succeeded"
    assert fleet.run_of(second)["outcome"] == "dispatched"
    one, two = fleet.executions()
    assert (one["task_id"], two["task_id"]) == (first.task_id, second.task_id)
    assert two["started_ms"] >= one["started_ms"] + 2_000  # sequential
    assert int(fleet.run_of(second)["started_ms"]) >= int(fleet.run_of(first)["finished_ms"])
    assert not fleet.redis.exists(fleet.keys.buffer("buffered"))
    assert fleet.slots("buffered") == 0


def test_retry_failure_and_expiry_are_recorded(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(fleet.settings, "-P", "threads", "-c", "2")
    retried = fleet.fire("flaky", "demo.number_sum", [2, 3], {"fail_times": 1})
    failing = fleet.fire("broken", "demo.number_sum", [], {"x": "a", "y": 1})
    expired = fleet.fire("late", expires_s=-1)

    state = wait_for(lambda: fleet.run_is(retried, "succeeded"), 20, "the flaky fire to succeed after a retry")
    assert state["attempts"] == "2"
    job_counters = fleet.redis.hgetall(fleet.keys.job_counters("flaky"))
    assert (job_counters["retried"], job_counters["succeeded"]) == ("1", "1")

    state = wait_for(lambda: fleet.run_is(failing, "failed"), 15, "the broken fire to fail")
    assert state["error"] == 'TypeError: can only concatenate str (not "int") to str'

    wait_for(lambda: fleet.run_is(expired, "expired"), 15, "the expired fire to be recorded")
    assert "attempts" not in fleet.run_of(expired)  # it never ran
    assert fleet.executions() == []

    counters = fleet.redis.hgetall(fleet.keys.counters)
    assert {k: counters.get(k) for k in ("retried", "succeeded", "failed", "expired")} == {
        "retried": "1",
        "succeeded": "1",
        "failed": "1",
        "expired": "1",
    }
    assert all(fleet.slots(job) == 0 for job in ("flaky", "broken", "late"))


def test_terminated_by_revoke_is_recorded_failed(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(fleet.settings, "-P", "prefork", "-c", "1")
    fire = fleet.fire("terminated", kwargs={"seconds": 30})
    wait_for(fleet.executions, 15, "the fire to start")
    fleet.app.control.revoke(fire.task_id, terminate=True)

    state = wait_for(lambda: fleet.run_is(fire, "failed"), 15, "the terminated fire to be recorded")
    assert state["error"] == "revoked"
    assert fleet.slots("terminated") == 0


def test_ad_hoc_tasks_do_not_touch_the_ledger(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(fleet.settings, "-P", "threads", "-c", "1")
    result = fleet.app.send_task("demo.record_fire", queue=fleet.settings.celery.default_queue)
    assert result.get(timeout=15)["job_id"] is None
    assert fleet.redis.keys(fleet.keys.key("fire", "*")) == []
    assert not fleet.redis.exists(fleet.keys.counters)


def test_heartbeat_is_written_and_removed_at_shutdown(fleet: Fleet, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(fleet.settings, "-P", "threads", "-c", "1")

    def beat() -> dict[str, Any] | None:
        raw = fleet.redis.hget(fleet.keys.workers, worker.hostname)
        return json.loads(raw) if raw else None

    first = wait_for(beat, 10, "the worker's heartbeat")
    # run_worker.py supervises: the heartbeat is the Celery worker's, its one child process.
    assert [first["pid"]] == [child.pid for child in psutil.Process(worker.process.pid).children()]
    assert set(first["tasks"]) >= {"demo.record_fire", "demo.number_sum"}
    assert first["queues"] == sorted([fleet.settings.celery.cron_queue, fleet.settings.celery.default_queue])
    assert abs(first["last_seen_ms"] - time.time() * 1000) < 10_000
    wait_for(lambda: (beat() or first)["last_seen_ms"] > first["last_seen_ms"], 10, "a later heartbeat")

    assert worker.stop() == 0
    assert not fleet.redis.hexists(fleet.keys.workers, worker.hostname)
