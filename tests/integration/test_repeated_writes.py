"""chronoq's writes are safe to send again (a real redis-server).

A write whose reply was lost, or that ``WAIT`` did not confirm (``REDIS_WAIT_REPLICAS``: it may
still have reached the replica that was promoted), is sent again by redis-py's retry and by
chronoq's own loops. Each script must then answer as if it had run once: the fire decided once,
the run lease still this delivery's, the outcome applied once, the API job written once.
And a delivery of a fire whose decision was discarded by a failover never runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from scheduler.jobstore import JobRecord, JobStore, spec_document
from scheduler.specs import JobSpec
from shared.errors import OwnershipError, VersionConflictError
from shared.fleet import FireIntent, FireLedger, Outcome, Overlap
from shared.names import RedisKeys, fire_task_id_of
from shared.redis import create_redis
from shared.settings import AppSettings

AT = "2030-01-01T00:00:00+00:00"


@pytest.fixture
def client(settings: AppSettings) -> Iterator[redis.Redis]:
    client = create_redis(settings.redis)
    yield client
    client.close()


def intent(job_id: str, queue: str, outcome: Outcome = Outcome.DISPATCHED) -> FireIntent:
    return FireIntent(
        job_id,
        AT,
        fire_task_id_of(job_id, AT),
        outcome,
        overlap=Overlap.ALLOW,
        slot_lapse_ms=60_000,
        deadline_ms=0,
        list_key=queue,
        payload="{}",
    )


def test_fire_scripts_sent_again_answer_as_once(client: redis.Redis, settings: AppSettings) -> None:
    keys = RedisKeys(settings.redis.key_prefix)
    ledger = FireLedger(client, keys)
    queue = settings.celery.cron_queue
    task_id = fire_task_id_of("j", AT)
    assert ledger.decide([intent("j", queue)], owner="t") == ["dispatched"]
    assert ledger.decide([intent("j", queue)], owner="t") == ["decided"]
    assert client.llen(queue) == 1  # one message
    first = ledger.start("j", AT, task_id, "h:1", 60_000, token="a1")
    assert first == ["run", "", 0, 1]
    assert ledger.start("j", AT, task_id, "h:1", 60_000, token="a1") == first  # the same start: its lease
    assert ledger.start("j", AT, task_id, "h:1", 60_000, token="b2")[:2] == ["busy", "h:1"]  # another delivery
    applied = ledger.finish("j", AT, task_id, Outcome.SUCCEEDED, runner="h:1", attempt=1)
    assert applied == ["applied", ""]
    assert ledger.finish("j", AT, task_id, Outcome.SUCCEEDED, runner="h:1", attempt=1)[0] == "stale"
    assert client.hget(keys.counters, "succeeded") == "1"


def test_a_delivery_of_a_discarded_decision_never_runs(client: redis.Redis, settings: AppSettings) -> None:
    keys = RedisKeys(settings.redis.key_prefix)
    ledger, strict = FireLedger(client, keys), FireLedger(client, keys, require_record=True)
    queue = settings.celery.cron_queue
    # The decision kept (on the new master) coalesced this fire; its message came from the old one.
    assert ledger.decide([intent("c", queue, Outcome.COALESCED)], owner="t") == ["coalesced"]
    assert ledger.start("c", AT, fire_task_id_of("c", AT), "h:1", 60_000) == ["done", "coalesced", 0, 0]
    assert strict.start("c", AT, fire_task_id_of("c", AT), "h:1", 60_000) == ["done", "coalesced", 0, 0]
    # No decision on record: with WAIT (require_record) it does not run and writes nothing...
    assert strict.start("n", AT, fire_task_id_of("n", AT), "h:1", 60_000) == ["done", "undecided", 0, 0]
    assert not client.exists(keys.fire("n", AT))
    # ...and the decision made later on the new master publishes its own message.
    assert ledger.decide([intent("n", queue)], owner="t") == ["dispatched"]
    assert strict.start("n", AT, fire_task_id_of("n", AT), "h:1", 60_000)[0] == "run"
    # Without WAIT a fire without a record still runs (messages published by tools).
    assert ledger.start("tool", AT, fire_task_id_of("tool", AT), "h:1", 60_000)[0] == "run"


def test_api_job_writes_sent_again_answer_as_once(settings: AppSettings) -> None:
    keys = RedisKeys(settings.redis.key_prefix)

    async def writes() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
        store = JobStore(client, keys)
        spec = JobSpec(id="api", task="demo.sleep", interval=5, source="api")
        record = JobRecord(id="api", spec=spec_document(spec), created_by="a")
        audit = {"action": "t", "job": "api", "note": "", "by": "t", "at_ms": 0}
        assert await store.write("create", "api", record=record, spec=spec, audit=audit) == (1, False)
        assert await store.write("create", "api", record=record, spec=spec, audit=audit) == (1, False)
        other = JobRecord(id="api", spec=spec_document(spec), created_by="b")
        with pytest.raises(OwnershipError, match="already exists"):
            await store.write("create", "api", record=other, spec=spec, audit=audit)
        changed = JobRecord(id="api", spec=spec_document(spec), created_by="a", note="edited")
        assert await store.write("update", "api", expected=1, record=changed, spec=spec, audit=audit) == (2, False)
        assert await store.write("update", "api", expected=1, record=changed, spec=spec, audit=audit) == (2, False)
        with pytest.raises(VersionConflictError):
            await store.write("update", "api", expected=1, record=other, spec=spec, audit=audit)
        assert await client.llen(keys.audit) == 2  # one entry per write applied
        assert await client.xlen(keys.changes) == 2
        await client.aclose()

    asyncio.run(writes())
