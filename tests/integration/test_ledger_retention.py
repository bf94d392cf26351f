"""Bounded fire records: the ledger keeps a job's last ``history_limit`` records plus those the
fence still needs, retires older ones, and fences retired fires for good (real Redis).

Fires here are scheduled in 2020 unless a test needs them recent: with a fence window of 0 s a
record beyond the history limit is retired as soon as nothing needs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio

from scheduler.state import StateStore
from shared.fleet import AuditCheck, FireIntent, FireLedger, Outcome, Overlap
from shared.names import RedisKeys, fire_task_id_of, format_scheduled_at
from shared.redis import create_redis
from shared.settings import AppSettings

pytestmark = pytest.mark.timeout(60)

LIMIT = 10
BASE = datetime(2020, 2, 28, 23, 59, 0, tzinfo=UTC)  # crosses a leap day


def stamp(i: int) -> str:
    return format_scheduled_at(BASE + timedelta(seconds=i))


class Ledger:
    def __init__(self, settings: AppSettings, fence_window_s: float = 0) -> None:
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.redis = create_redis(settings.redis)
        self.queue = self.keys.key("queue")
        self.ledger = FireLedger(self.redis, self.keys, history_limit=LIMIT, fence_window_s=fence_window_s)

    def intent(self, job_id: str, at: str, overlap: Overlap = Overlap.ALLOW, lapse_ms: int = 60_000) -> FireIntent:
        return FireIntent(
            job_id,
            at,
            fire_task_id_of(job_id, at),
            Outcome.DISPATCHED,
            overlap=overlap,
            slot_lapse_ms=lapse_ms,
            list_key=self.queue,
            payload=f"{job_id}|{at}",
        )

    def fire(self, job_id: str, at: str, *, run: bool = True, **kw: object) -> str:
        """Decide one fire; if dispatched and ``run``, run it to success as a worker would."""
        (result,) = self.ledger.decide([self.intent(job_id, at, **kw)], owner="test")  # type: ignore[arg-type]
        if result == "dispatched" and run:
            self.run(job_id, at)
        return str(result)

    def run(self, job_id: str, at: str) -> None:
        task_id = fire_task_id_of(job_id, at)
        verdict, _, _, attempt = self.ledger.start(job_id, at, task_id, "h:1", 60_000)
        assert verdict == "run"
        assert self.ledger.finish(job_id, at, task_id, Outcome.SUCCEEDED, runner="h:1", attempt=int(attempt)) == [
            "applied",
            "",
        ]

    def fire_keys(self, job_id: str) -> list[str]:
        return sorted(self.redis.scan_iter(self.keys.fire(job_id, "*"), count=1000))

    def history(self, job_id: str) -> list[str]:
        return [str(s) for s in self.redis.lrange(self.keys.history(job_id), 0, -1)]


@pytest.fixture
def ledger(settings: AppSettings) -> Iterator[Ledger]:
    ledger = Ledger(settings)
    yield ledger
    ledger.redis.close()


def test_records_stay_bounded_and_the_last_n_are_kept(ledger: Ledger) -> None:
    for i in range(300):
        assert ledger.fire("fast", stamp(i)) == "dispatched"
    assert len(ledger.fire_keys("fast")) == LIMIT
    assert ledger.history("fast") == [stamp(i) for i in range(299, 289, -1)]
    assert ledger.fire_keys("fast") == sorted(ledger.keys.fire("fast", stamp(i)) for i in range(290, 300))
    assert ledger.redis.hget(ledger.keys.fence, "fast") == stamp(289)
    assert ledger.redis.llen(ledger.queue) == 300


async def test_jobs_history_shows_the_last_n(ledger: Ledger, settings: AppSettings) -> None:
    for i in range(3 * LIMIT):
        ledger.fire("shown", stamp(i))
    client = redis.asyncio.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    try:
        fires = await StateStore(client, ledger.keys).history("shown", LIMIT)
    finally:
        await client.aclose()
    assert [f["scheduled_at"] for f in fires] == [stamp(i) for i in range(3 * LIMIT - 1, 2 * LIMIT - 1, -1)]
    assert {f["final"] for f in fires} == {"succeeded"}


def test_a_retired_fire_is_fenced_not_published_again(ledger: Ledger) -> None:
    for i in range(0, 100, 2):  # every other second; the odd ones are never decided
        ledger.fire("fenced", stamp(i))
    mark = str(ledger.redis.hget(ledger.keys.fence, "fenced"))
    assert mark == stamp(100 - 2 * LIMIT - 2)
    queued = ledger.redis.llen(ledger.queue)
    counters = ledger.redis.hgetall(ledger.keys.job_counters("fenced"))
    older = [stamp(0), stamp(37), stamp(100 - 2 * LIMIT - 2)]  # retired, never decided, the mark itself
    results = ledger.ledger.decide([ledger.intent("fenced", at) for at in older], owner="late-replica")
    assert results == ["decided"] * 3
    assert ledger.ledger.decided([("fenced", at) for at in older]) == [1, 1, 1]
    assert ledger.redis.llen(ledger.queue) == queued
    assert ledger.redis.hgetall(ledger.keys.job_counters("fenced")) == counters
    assert not any(ledger.redis.exists(ledger.keys.fire("fenced", at)) for at in older)
    # Past the mark, fires are decided as usual (a sub-second fire just after it included).
    newer = format_scheduled_at(datetime.fromisoformat(mark) + timedelta(microseconds=1))
    assert ledger.ledger.decided([("fenced", newer), ("fenced", stamp(101))]) == [0, 0]
    assert ledger.fire("fenced", newer, run=False) == "dispatched"


def test_the_fence_compares_instants_across_dates(ledger: Ledger) -> None:
    """The scripts turn scheduled_at into epoch microseconds themselves."""
    cases = [
        ("2020-02-29T00:00:00+00:00", "2020-02-28T23:59:59.999999+00:00", "2020-02-29T00:00:00.000001+00:00"),
        ("2000-01-01T00:00:00+00:00", "1999-12-31T23:59:59+00:00", "2000-01-01T00:00:01+00:00"),
        ("2100-03-01T12:00:00.500000+00:00", "2100-02-28T12:00:00+00:00", "2100-03-01T12:00:00.500001+00:00"),
        ("2026-12-31T23:59:59+00:00", "2026-12-31T23:59:58.999999+00:00", "2027-01-01T00:00:00+00:00"),
    ]
    for n, (mark, before, after) in enumerate(cases):
        job_id = f"dates-{n}"
        ledger.redis.hset(ledger.keys.fence, job_id, mark)
        assert ledger.ledger.decided([(job_id, before), (job_id, mark), (job_id, after)]) == [1, 1, 0], mark


def test_records_still_needed_are_kept(ledger: Ledger) -> None:
    """A queued fire (slot held) stops the retiring until its worker reports; then the backlog
    drains and the worker's report still applies."""
    assert ledger.fire("held", stamp(0), run=False) == "dispatched"
    for i in range(1, 60):
        ledger.fire("held", stamp(i))
    assert ledger.redis.exists(ledger.keys.fire("held", stamp(0)))
    assert len(ledger.fire_keys("held")) == 60
    assert ledger.redis.hget(ledger.keys.fence, "held") is None
    ledger.run("held", stamp(0))  # the worker reports late: applied, the slot is freed
    for i in range(60, 120):  # each decide retires up to two: the backlog drains
        ledger.fire("held", stamp(i))
    assert len(ledger.fire_keys("held")) == LIMIT
    assert ledger.redis.zcard(ledger.keys.inflight("held")) == 0


def test_a_fire_never_started_is_kept_until_the_dispatch_audit_ends_it(ledger: Ledger) -> None:
    """Its slot lapsed, but its run never started: the record stays (and stops the retiring)
    until the audit has republished it and it ran, or recorded it lost; then it retires."""
    assert ledger.fire("quiet", stamp(0), run=False, lapse_ms=1) == "dispatched"
    for i in range(1, 40):
        ledger.fire("quiet", stamp(i))
    assert ledger.redis.zcard(ledger.keys.inflight("quiet")) == 0  # the slot lapsed long ago
    assert ledger.redis.exists(ledger.keys.fire("quiet", stamp(0)))
    assert len(ledger.fire_keys("quiet")) == 40
    lost = AuditCheck("quiet", stamp(0), 1, "lost", data="its message was nowhere")
    assert ledger.ledger.audit([lost], [ledger.queue + ":none"], ("unacked", "unacked_index"), 10)[0][0] == "lost"
    assert ledger.redis.zcard(ledger.keys.dispatched) == 0
    for i in range(40, 80):
        ledger.fire("quiet", stamp(i))
    assert len(ledger.fire_keys("quiet")) == LIMIT
    assert ledger.redis.hget(ledger.keys.fence, "quiet") is not None


def test_a_buffered_fire_is_kept_until_it_is_dispatched(ledger: Ledger) -> None:
    one: dict[str, Any] = {"overlap": Overlap.BUFFER_ONE}
    assert ledger.fire("buf", stamp(0), run=False, **one) == "dispatched"
    assert ledger.fire("buf", stamp(1), run=False, **one) == "buffered"
    for i in range(2, 40):
        assert ledger.fire("buf", stamp(i), run=False, **one) == "skipped"
    assert ledger.redis.exists(ledger.keys.fire("buf", stamp(0)), ledger.keys.fire("buf", stamp(1))) == 2
    ledger.run("buf", stamp(0))  # frees the slot: the buffered fire goes out
    assert ledger.redis.hget(ledger.keys.fire("buf", stamp(1)), "outcome") == "dispatched"
    # last_fire is written by one Lua function, whether decide or a freed slot dispatched it.
    released = json.loads(str(ledger.redis.hget(ledger.keys.last_fire, "buf")))
    assert released == {
        "scheduled_at": stamp(1),
        "dispatched_ms": released["dispatched_ms"],
        "task_id": fire_task_id_of("buf", stamp(1)),
    }
    ledger.fire("direct", stamp(0))
    assert json.loads(str(ledger.redis.hget(ledger.keys.last_fire, "direct"))).keys() == released.keys()
    ledger.run("buf", stamp(1))
    for i in range(40, 80):
        assert ledger.fire("buf", stamp(i), **one) == "dispatched"
    assert len(ledger.fire_keys("buf")) == LIMIT


def test_a_worker_reporting_on_a_retired_fire_writes_nothing(ledger: Ledger) -> None:
    assert ledger.fire("late", stamp(0), run=False, lapse_ms=1) == "dispatched"  # its slot lapses at once
    lost = AuditCheck("late", stamp(0), 1, "lost", data="its message was nowhere")  # the audit ends it
    assert ledger.ledger.audit([lost], [ledger.queue + ":none"], ("unacked", "unacked_index"), 10)[0][0] == "lost"
    for i in range(1, 40):
        ledger.fire("late", stamp(i))
    fire = ledger.keys.fire("late", stamp(0))
    assert not ledger.redis.exists(fire)
    counters = ledger.redis.hgetall(ledger.keys.counters)
    task_id = fire_task_id_of("late", stamp(0))
    assert ledger.ledger.start("late", stamp(0), task_id, "h:2", 60_000) == ["done", "retired", 0, 0]
    assert ledger.ledger.finish("late", stamp(0), task_id, Outcome.EXPIRED, runner="") == ["stale", "retired"]
    assert ledger.ledger.finish("late", stamp(0), task_id, Outcome.FAILED, runner="h:2") == ["stale", "retired"]
    assert not ledger.redis.exists(fire)
    assert ledger.redis.zscore(ledger.keys.inflight("late"), task_id) is None
    assert ledger.redis.hgetall(ledger.keys.counters) == counters


def test_recent_records_are_kept_for_the_fence_window(settings: AppSettings) -> None:
    """Fires newer than the fence window keep their records past the history limit, a manual
    trigger (scheduled now) included."""
    ledger = Ledger(settings, fence_window_s=3600)
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        for i in range(30):
            ledger.fire("recent", format_scheduled_at(now - timedelta(seconds=30 - i)))
        ledger.fire("recent", format_scheduled_at(datetime.now(UTC)))
        assert len(ledger.fire_keys("recent")) == 31
        assert ledger.redis.hget(ledger.keys.fence, "recent") is None
    finally:
        ledger.redis.close()
