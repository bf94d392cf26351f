"""The dispatch audit (#23): a dispatched fire whose message went missing runs exactly once.

Each case puts one fire's message where kombu alone never delivers it (or leaves it queued),
runs the leader's audit (:class:`scheduler.audit.DispatchAudit`, in a thread of this process)
with a short visibility timeout and audit interval, starts a real worker, and counts the runs
from a ledger on a Redis of its own (``tests/faults/ledger_tasks.py``). The broker is a Redis of
the test's own too: kombu's ``unacked`` hash has one name for every queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from scheduler.audit import DispatchAudit
from scheduler.encoder import MessageEncoder
from scheduler.fires import Fire, Limits
from scheduler.specs import JobSpec
from shared.celery_app import create_celery_app
from shared.fleet import scheduler_ledger
from shared.names import RedisKeys
from shared.redis import create_async_redis, create_redis
from shared.settings import AppSettings
from tests.conftest import WorkerProcess, make_settings, wait_for
from tests.faults.harness import RedisProcess
from tests.faults.ledger_tasks import read_ledger
from tests.integration.test_worker_fleet import never

pytestmark = pytest.mark.timeout(90)

VISIBILITY_TIMEOUT_S = 2
TIME_LIMIT_S = 1
SLOT_MARGIN_S = 0
AUDIT_INTERVAL_S = 0.5
AUDIT_MARGIN_S = 0.5
PICKUP_SLACK_S = 3.0
"""A worker takes a message put back in its queue within this (its doorbell; a loaded machine)."""
DEADLINE_S = VISIBILITY_TIMEOUT_S + AUDIT_MARGIN_S + AUDIT_INTERVAL_S + PICKUP_SLACK_S
"""A fire runs at most this long after its dispatch: the audit looks at it once the visibility
timeout plus the margin have passed, within one interval; then a worker picks it up."""


class AuditRig:
    """One job's fires published as the scheduler publishes them, the audit running in a thread."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.redis = create_redis(settings.redis)
        self.ledger = scheduler_ledger(self.redis, settings)
        self.app = create_celery_app(settings)
        self.encoder = MessageEncoder(self.app)
        self.limits = Limits.from_settings(settings)
        self.job = JobSpec(id="audited", task="faults.ledger", interval=3600, queue=settings.celery.cron_queue)
        self.list_key = self.encoder.list_key(self.job.queue, self.job.priority)
        self.unacked, self.unacked_index = self.encoder.unacked_keys()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def dispatch(self, minutes_ago: int = 0) -> Fire:
        """Decide and publish one fire (nominal time now, whole seconds) as the dispatcher does."""
        now = datetime.now(UTC)
        fire = Fire(self.job, now.replace(microsecond=0) - timedelta(minutes=minutes_ago))
        [encoded] = self.encoder.encode([fire.message(now, self.limits)])
        assert self.ledger.decide([fire.intent(now, self.limits, encoded)], owner="test") == ["dispatched"]
        return fire

    def payloads(self) -> list[str]:
        return [str(item) for item in self.redis.lrange(self.list_key, 0, -1)]

    def record(self, fire: Fire) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.redis.hgetall(self.keys.fire(self.job.id, fire.stamp)).items()}

    def counter(self, name: str) -> int:
        return int(self.redis.hget(self.keys.counters, name) or 0)

    def start_audit(self) -> None:
        async def main() -> None:
            client = create_async_redis(self.settings.redis)
            ledger = scheduler_ledger(client, self.settings)
            jobs = {self.job.id: self.job}
            audit = DispatchAudit(ledger, client, self.encoder, self.limits, self.settings, jobs.get)
            task = asyncio.get_running_loop().create_task(audit.run())
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.wait([task])
            await client.aclose()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.app.close()
        self.redis.close()


@pytest.fixture
def broker(redis_process: Callable[..., RedisProcess]) -> RedisProcess:
    return redis_process(appendonly=False)


@pytest.fixture
def ledger_server(redis_process: Callable[..., RedisProcess]) -> RedisProcess:
    return redis_process(appendonly=False)


@pytest.fixture
def rig(broker: RedisProcess, namespace: str) -> Iterator[AuditRig]:
    settings = make_settings(
        broker.url,
        namespace,
        celery={"visibility_timeout_s": VISIBILITY_TIMEOUT_S, "task_time_limit_s": TIME_LIMIT_S},
        scheduler={
            "slot_margin_s": SLOT_MARGIN_S,
            "audit_interval_s": AUDIT_INTERVAL_S,
            "audit_margin_s": AUDIT_MARGIN_S,
        },
    )
    rig = AuditRig(settings)
    yield rig
    rig.close()


def start_audited_worker(
    start_worker: Callable[..., WorkerProcess], rig: AuditRig, ledger_server: RedisProcess
) -> WorkerProcess:
    env = {
        "TASK_MODULES": "tests.faults.ledger_tasks",
        "FAULTS_LEDGER_URL": ledger_server.url,
        "CELERY_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "CELERY_TASK_TIME_LIMIT_S": str(TIME_LIMIT_S),
        "SCHEDULER_SLOT_MARGIN_S": str(SLOT_MARGIN_S),
    }
    return start_worker(rig.settings, "-P", "threads", "-c", "2", extra_env=env)


def runs_of(ledger_server: RedisProcess, fire: Fire) -> list[dict[str, Any]]:
    with ledger_server.client() as client:
        return [e for e in read_ledger(client) if e["event"] == "start" and e["task_id"] == fire.task_id]


def assert_runs_once_in_time(ledger_server: RedisProcess, rig: AuditRig, fire: Fire, worker: WorkerProcess) -> None:
    """The fire runs within :data:`DEADLINE_S` of its dispatch, and once only (its record says
    succeeded, and no second run comes within two more audit intervals and a second)."""
    dispatched_ms = int(rig.record(fire)["dispatched_ms"])
    left_s = DEADLINE_S - (time.time() - dispatched_ms / 1000)
    wait_for(lambda: runs_of(ledger_server, fire), max(left_s, 0.1), f"a run of {fire.stamp}:\n{worker.log()[-3000:]}")
    [run] = runs_of(ledger_server, fire)
    assert run["ms"] - dispatched_ms <= DEADLINE_S * 1000
    wait_for(lambda: rig.record(fire).get("run") == "succeeded", 10, "the run recorded succeeded")
    never(lambda: len(runs_of(ledger_server, fire)) > 1, 2 * AUDIT_INTERVAL_S + 1.0)


def test_a_message_removed_from_its_queue_is_published_again_and_runs_once(
    rig: AuditRig, ledger_server: RedisProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    fire = rig.dispatch()
    [payload] = rig.payloads()
    assert rig.redis.lrem(rig.list_key, 0, payload) == 1
    rig.start_audit()
    worker = start_audited_worker(start_worker, rig, ledger_server)
    assert_runs_once_in_time(ledger_server, rig, fire, worker)
    assert rig.counter("recovered_republished") == 1
    record = rig.record(fire)
    assert (record["audit"], record["republished"]) == ("republished", "1")
    assert "published again by the dispatch audit" in record["reason"]


def test_an_unacked_entry_without_its_index_is_put_back_and_runs_once(
    rig: AuditRig, ledger_server: RedisProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    fire = rig.dispatch()
    payload = str(rig.redis.rpop(rig.list_key))
    # As a take (workers/lua/take.lua) records it, but without the index entry kombu's sweep reads.
    rig.redis.hset(rig.unacked, fire.task_id, f'[{payload}, "", "{rig.job.queue}"]')
    rig.start_audit()
    worker = start_audited_worker(start_worker, rig, ledger_server)
    assert_runs_once_in_time(ledger_server, rig, fire, worker)
    assert rig.counter("recovered_reindexed") == 1
    assert rig.counter("recovered_republished") == 0
    assert "put back in kombu's unacked index" in rig.record(fire)["reason"]
    assert not rig.redis.hexists(rig.unacked, fire.task_id)


def test_a_message_still_queued_behind_an_absent_worker_is_not_published_again(
    rig: AuditRig, ledger_server: RedisProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    fire = rig.dispatch()
    rig.start_audit()
    wait_for(lambda: rig.counter("recovered_queued") == 1, DEADLINE_S, "the audit to find the fire queued")
    assert rig.record(fire)["audit"] == "queued"
    never(lambda: rig.counter("recovered_republished") or len(rig.payloads()) != 1, 3 * AUDIT_INTERVAL_S)
    worker = start_audited_worker(start_worker, rig, ledger_server)
    wait_for(lambda: runs_of(ledger_server, fire), 10, f"a run of {fire.stamp}:\n{worker.log()[-3000:]}")
    never(lambda: len(runs_of(ledger_server, fire)) > 1, 2 * AUDIT_INTERVAL_S + 1.0)
    assert rig.counter("recovered_queued") == 1  # counted once per fire, however often it is looked at


def test_a_republished_fire_whose_first_copy_turns_up_later_runs_once(
    rig: AuditRig, ledger_server: RedisProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    fire = rig.dispatch()
    first = str(rig.redis.rpop(rig.list_key))
    rig.start_audit()
    wait_for(lambda: rig.counter("recovered_republished") == 1, DEADLINE_S, "the audit to publish the fire again")
    [copy] = rig.payloads()
    assert copy != first and fire.task_id in copy  # another delivery tag, the same task id and headers
    rig.redis.lpush(rig.list_key, first)  # the first copy turns up: two deliveries of one fire
    worker = start_audited_worker(start_worker, rig, ledger_server)
    assert_runs_once_in_time(ledger_server, rig, fire, worker)
    wait_for(lambda: not rig.payloads(), 10, "both copies taken")
    wait_for(lambda: "duplicate delivery skipped" in worker.log(), 10, "the second copy turned away")
    assert len(runs_of(ledger_server, fire)) == 1


def test_a_fire_whose_message_is_nowhere_past_its_expiry_is_recorded_lost(rig: AuditRig) -> None:
    fire = rig.dispatch(minutes_ago=2)  # its message (grace 60 s) expired a minute ago
    rig.redis.delete(rig.list_key)
    rig.start_audit()
    wait_for(lambda: rig.record(fire).get("outcome") == "lost", DEADLINE_S, "the fire recorded lost")
    assert rig.counter("lost") == 1 and rig.counter("recovered_republished") == 0
    assert rig.redis.zcard(rig.keys.inflight(rig.job.id)) == 0  # its slot is free: the record can retire
    assert rig.redis.zcard(rig.keys.dispatched) == 0
    assert not rig.payloads()
