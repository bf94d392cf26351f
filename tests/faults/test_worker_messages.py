"""The worker under hostile messages and overrunning tasks (#11 defects 2, 3, 10; fault list).

Real workers on a real Redis; what ran is read from the ledger task's own Redis
(``tests/faults/ledger_tasks.py``), outcomes and slots from the fire ledger.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from shared.settings import AppSettings
from tests.conftest import WorkerProcess, chronoq, wait_for
from tests.faults.harness import RedisProcess
from tests.faults.ledger_tasks import peak_concurrency, read_ledger
from tests.faults.test_worker_faults import fault_env, fault_settings
from tests.integration.test_worker_fleet import Fleet

pytestmark = pytest.mark.timeout(90)

SECRET = "SECRETMARK-do-not-log"


@pytest.fixture
def broker(redis_process: Callable[..., RedisProcess]) -> RedisProcess:
    return redis_process(appendonly=False)


@pytest.fixture
def ledger_server(redis_process: Callable[..., RedisProcess]) -> RedisProcess:
    return redis_process(appendonly=False)


@pytest.fixture
def ledger(ledger_server: RedisProcess) -> Iterator[redis.Redis]:
    with ledger_server.client() as client:
        yield client


@pytest.fixture
def settings(broker: RedisProcess, namespace: str) -> AppSettings:
    return fault_settings(broker, namespace)


@pytest.fixture
def fleet(settings: AppSettings) -> Iterator[Fleet]:
    fleet = Fleet(settings)
    yield fleet
    fleet.close()


def envelope(queue: str, content_type: str, body: bytes) -> str:
    """A kombu message for the task ``faults.ledger`` with the given content type and body."""
    task_id = str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {"lang": "py", "task": "faults.ledger", "id": task_id, "root_id": task_id},
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": queue, "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def test_poison_messages_are_set_aside_and_the_worker_keeps_serving(
    fleet: Fleet,
    settings: AppSettings,
    ledger_server: RedisProcess,
    ledger: redis.Redis,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings, "-P", "threads", "-c", "1", extra_env=fault_env(ledger_server))
    queue = settings.celery.cron_queue
    poison = [
        b"\x80garbage{{{" + SECRET.encode(),  # not even JSON
        envelope(queue, "application/x-python-serialize", b"\x80\x04" + SECRET.encode()).encode(),  # pickle
        envelope(queue, "application/json", b"{not json " + SECRET.encode()).encode(),  # a body that is no JSON
    ]
    for item in poison:
        fleet.redis.lpush(queue, item)
    wait_for(lambda: fleet.redis.llen(queue) == 0, 15, "the worker to take the poison")
    fleet.fire("after-poison", "faults.ledger")

    wait_for(lambda: read_ledger(ledger), 20, "a normal fire to run after the poison")
    assert worker.process.poll() is None
    assert fleet.redis.hget(fleet.keys.counters, "poison") == str(len(poison))
    aside = [json.loads(entry) for entry in fleet.redis.lrange(fleet.keys.poison, 0, -1)]
    assert len(aside) == len(poison) and all(entry["queue"] == queue for entry in aside)
    assert base64.b64decode(aside[-1]["raw_b64"]) == poison[0]
    log = worker.log()
    assert log.count("poison message set aside") == len(poison)
    assert SECRET not in log and "garbage" not in log
    assert "Unrecoverable error" not in log


def test_threads_pool_keeps_the_slot_of_a_task_past_its_time_limit(
    fleet: Fleet,
    settings: AppSettings,
    ledger_server: RedisProcess,
    ledger: redis.Redis,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings, "-P", "threads", "-c", "2", extra_env=fault_env(ledger_server))
    assert "pool threads enforces no time limit" in worker.log()
    options: dict[str, Any] = {"max_instances": 1, "time_limit_s": 3, "slot_lapse_ms": 5_000}
    first = fleet.fire("long", "faults.ledger", kwargs={"seconds": 12}, **options)
    assert first.outcome == "dispatched"
    wait_for(lambda: read_ledger(ledger), 15, "the long task to start")
    started = time.monotonic()
    later: list[Any] = []
    # Fires every second, well past time limit + margin (4 s): each finds the slot still held.
    while time.monotonic() - started < 9:
        later.append(fleet.fire("long", "faults.ledger", minute=len(later) + 1, **options))
        time.sleep(1)
    assert [fire.outcome for fire in later] == ["skipped"] * len(later)
    assert peak_concurrency(read_ledger(ledger), "long", int(time.time() * 1000)) == 1
    wait_for(lambda: "fire over its time limit job_id=long" in worker.log(), 10, "the overrun to be reported")
    state = wait_for(lambda: fleet.run_is(first, "succeeded"), 20, "the long task to end")
    assert state["attempts"] == "1"
    assert fleet.slots("long") == 0


def test_prefork_hard_limit_ends_a_never_ending_task_and_frees_its_slot(
    fleet: Fleet,
    settings: AppSettings,
    ledger_server: RedisProcess,
    ledger: redis.Redis,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings, "-P", "prefork", "-c", "1", extra_env=fault_env(ledger_server))
    fire = fleet.fire("forever", "faults.ledger", kwargs={"seconds": 3600}, time_limit_s=2)
    state = wait_for(lambda: fleet.run_is(fire, "failed"), 20, "the hard time limit to end the task")
    assert state["error"].startswith("TimeLimitExceeded")
    assert fleet.slots("forever") == 0
    assert [e["event"] for e in read_ledger(ledger)] == ["start"]


def test_unregistered_task_fails_the_fire_frees_its_slot_and_status_warns(
    fleet: Fleet,
    settings: AppSettings,
    ledger_server: RedisProcess,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings, "-P", "threads", "-c", "1", extra_env=fault_env(ledger_server))
    ghost = fleet.fire("ghost", "no.such.task", args=[SECRET], slot_lapse_ms=1_800_000)
    state = wait_for(lambda: fleet.run_is(ghost, "failed"), 15, "the unknown task's fire to be recorded failed")
    assert state["error"] == "unregistered task no.such.task"
    assert fleet.slots("ghost") == 0
    assert fleet.fire("ghost", "no.such.task", minute=1).outcome == "dispatched"  # not skipped
    assert SECRET not in worker.log()

    # The scheduler's registry names the job's task; the worker's heartbeat lists its own.
    fleet.redis.hset(fleet.keys.jobs, "ghost", json.dumps({"id": "ghost", "task": "no.such.task"}))
    fleet.redis.hset(fleet.keys.jobs, "fine", json.dumps({"id": "fine", "task": "faults.ledger"}))
    wait_for(lambda: fleet.redis.hexists(fleet.keys.workers, worker.hostname), 10, "the worker's heartbeat")
    out = chronoq(settings, "status", check=False).stdout
    assert "task no.such.task (jobs ghost) is registered by no live worker" in out
    assert "faults.ledger (jobs" not in out


def test_fires_that_expire_while_no_worker_runs_are_recorded_expired_never_run(
    fleet: Fleet,
    settings: AppSettings,
    ledger_server: RedisProcess,
    ledger: redis.Redis,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    fires = [fleet.fire("brief", "faults.ledger", minute=m, expires_s=2, max_instances=5) for m in range(3)]
    queued_at = time.time()
    wait_for(lambda: time.time() > queued_at + 3, 10, "the fires to expire with no worker running")
    start_worker(settings, "-P", "threads", "-c", "2", extra_env=fault_env(ledger_server))
    for fire in fires:
        wait_for(lambda f=fire: fleet.run_is(f, "expired"), 15, "the expired fire to be recorded")  # type: ignore[misc]
    assert fleet.slots("brief") == 0
    fleet.fire("brief", "faults.ledger", minute=10, max_instances=5)
    wait_for(lambda: read_ledger(ledger), 15, "a fresh fire to run")
    assert {e["scheduled_at"] for e in read_ledger(ledger)} == {"2026-03-01T12:10:00+00:00"}
