"""Look-ahead dispatch without Redis: fires handed over early are prepared ahead and decided at
their time, never before; shutdown drops fires not yet due; the heap job store keeps order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from scheduler.dispatch import Dispatcher, Limits
from scheduler.lookahead import HANDOVER_TICK_S, HeapJobStore
from scheduler.manager import SchedulerManager
from scheduler.message import TaskMessage
from scheduler.planner import jitter_of
from scheduler.specs import JobDefaults, JobSpec
from shared.fleet import FireIntent, Outcome
from shared.settings import SchedulerSettings

pytestmark = pytest.mark.timeout(30)


class FakeEncoder:
    def __init__(self) -> None:
        self.encoded_at: dict[str, float] = {}

    def encode(self, messages: Sequence[TaskMessage]) -> list[tuple[str, str]]:
        for message in messages:
            self.encoded_at[message.headers["scheduled_at"]] = time.time()
        return [("queue", f"payload {message.task_id}") for message in messages]


class FakeLedger:
    """Records what is decided and when; every fire is dispatched unless decided before."""

    def __init__(self) -> None:
        self.log: list[tuple[float, FireIntent]] = []

    async def decided(self, fires: Sequence[tuple[str, str]]) -> list[int]:
        return [0 for _ in fires]  # nobody decided them: a backup publishes them

    async def decide(self, fires: Sequence[FireIntent], owner: str) -> list[str]:
        now = time.time()
        self.log += [(now, fire) for fire in fires]
        return [fire.outcome.value for fire in fires]


def spec(**fields: Any) -> JobSpec:
    return JobSpec(**{"id": "job", "task": "demo.sleep", "interval": 1, **fields})


def dispatcher(ledger: FakeLedger, encoder: FakeEncoder) -> Dispatcher:
    return Dispatcher(ledger, encoder, "test", Limits(time_limit_s=60))


async def wait_until(predicate: Any, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_fires_handed_over_early_are_encoded_ahead_and_decided_never_before_due() -> None:
    ledger, encoder = FakeLedger(), FakeEncoder()
    d = dispatcher(ledger, encoder)
    d.start()
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    # coalesce off: on a loaded machine two fires of a job can be due in one decide call, and
    # the older would be coalesced (never encoded), which is not what this test is about
    jittery = spec(id="jittery", jitter=0.3, coalesce=False)
    times = [base + timedelta(milliseconds=100 * i) for i in range(5)]
    d.submit(spec(coalesce=False), times)
    d.submit(jittery, times)
    await wait_until(lambda: len(ledger.log) == 10)
    for decided_at, intent in ledger.log:
        nominal = datetime.fromisoformat(intent.scheduled_at)
        release = nominal.timestamp() + (jitter_of(jittery, nominal) if intent.job_id == "jittery" else 0)
        assert decided_at >= release, f"{intent.job_id} {intent.scheduled_at} decided {release - decided_at:.4f}s early"
        assert intent.payload, intent.outcome  # prepared: the message came encoded
        assert encoder.encoded_at[intent.scheduled_at] < nominal.timestamp()  # ... ahead of its time
    assert await d.drain(timeout_s=2)


async def test_pause_resume_and_removal_after_hand_over_apply_at_the_due_time() -> None:
    ledger, encoder = FakeLedger(), FakeEncoder()
    d = dispatcher(ledger, encoder)
    states = {"paused-later": "paused", "resumed-later": "active", "removed-later": "gone", "kept": "active"}
    d.job_state = lambda job: states[job.id]
    d.start()
    at = datetime.now(UTC) + timedelta(seconds=0.5)
    for job_id in ("paused-later", "removed-later", "kept"):
        d.submit(spec(id=job_id), [at])  # handed over while active
    d.record_skipped(spec(id="resumed-later"), [at], "paused")  # handed over while paused
    await wait_until(lambda: len(ledger.log) == 3)
    assert await d.drain(timeout_s=2)
    decided = {intent.job_id: intent for _, intent in ledger.log}
    assert decided["paused-later"].outcome is Outcome.SKIPPED
    assert decided["paused-later"].reason == "paused"
    assert decided["resumed-later"].outcome is Outcome.DISPATCHED
    assert decided["resumed-later"].payload  # encoded when it turned out to run after all
    assert decided["kept"].outcome is Outcome.DISPATCHED
    assert "removed-later" not in decided


async def test_a_promoted_follower_moves_its_backup_fires_to_their_due_time() -> None:
    ledger, encoder = FakeLedger(), FakeEncoder()
    leader = False
    d = Dispatcher(ledger, encoder, "test", Limits(time_limit_s=60), takeover_s=30, is_leader=lambda: leader)
    d.start()
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    d.submit(spec(), [at])
    # Held as a backup until at + 30 s, and still held once its own due time has passed.
    await wait_until(lambda: [f.release_ts >= at.timestamp() + 29.9 for f in d.timeline.held()] == [True])
    await wait_until(lambda: time.time() > at.timestamp() + 0.1)
    assert [f.backup for f in d.timeline.held()] == [True]
    assert ledger.log == []
    leader = True
    d.promote()
    await wait_until(lambda: len(ledger.log) == 1, timeout_s=2)
    decided_at, intent = ledger.log[0]
    assert intent.outcome is Outcome.DISPATCHED
    assert decided_at - at.timestamp() < 1.5
    assert await d.drain(timeout_s=2)


async def test_lanes_overlap_batches_and_keep_each_jobs_fires_in_order() -> None:
    """A burst in batches of 10 over 2 lanes: two batches are with the ledger at once, and each
    job's fires reach it in their order (a job belongs to one lane)."""

    class SlowLedger(FakeLedger):
        def __init__(self) -> None:
            super().__init__()
            self.in_flight = self.most_in_flight = 0

        async def decide(self, fires: Sequence[FireIntent], owner: str) -> list[str]:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(0.02)
            self.in_flight -= 1
            return await super().decide(fires, owner)

    ledger, encoder = SlowLedger(), FakeEncoder()
    d = Dispatcher(ledger, encoder, "test", Limits(time_limit_s=60), batch_size=10)
    d.start()
    first = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10)
    times = [first + timedelta(seconds=i) for i in range(5)]
    for n in range(20):
        d.submit(spec(id=f"j{n}"), times)  # all due: decided at once, 100 fires
    await wait_until(lambda: len(ledger.log) == 100)
    assert ledger.most_in_flight == 2
    for n in range(20):
        assert [i.scheduled_at for _, i in ledger.log if i.job_id == f"j{n}"] == sorted(t.isoformat() for t in times)
    assert await d.drain(timeout_s=2)


async def test_drain_decides_due_fires_and_drops_fires_not_yet_due() -> None:
    ledger, encoder = FakeLedger(), FakeEncoder()
    d = dispatcher(ledger, encoder)
    d.start()
    now = datetime.now(UTC)
    past = now - timedelta(seconds=0.5)  # due, waiting for its jitter
    future = now + timedelta(seconds=30)  # handed over ahead of its time
    d.submit(spec(id="late", jitter=60), [past])
    d.submit(spec(id="early"), [future])
    d.record_skipped(spec(id="paused"), [future], "paused")
    assert await d.drain(timeout_s=2)
    assert [(i.job_id, i.outcome) for _, i in ledger.log] == [("late", Outcome.DISPATCHED)]
    assert d.outcomes == {"dispatched": 1}


async def test_only_fires_already_due_coalesce() -> None:
    ledger, encoder = FakeLedger(), FakeEncoder()
    d = dispatcher(ledger, encoder)
    d.start()
    now = datetime.now(UTC)
    times = [now - timedelta(seconds=2), now - timedelta(seconds=1), now + timedelta(seconds=1)]
    d.submit(spec(coalesce=True), times)
    await wait_until(lambda: len(ledger.log) == 3)
    outcomes = {datetime.fromisoformat(i.scheduled_at): i.outcome for _, i in ledger.log}
    assert outcomes == {times[0]: Outcome.COALESCED, times[1]: Outcome.DISPATCHED, times[2]: Outcome.DISPATCHED}
    assert await d.drain(timeout_s=2)


class FakeClock:
    """A clock the test moves: wall time from 2030-01-01 plus a few ms, monotonic from 0."""

    def __init__(self) -> None:
        self.wall = datetime(2030, 1, 1, tzinfo=UTC).timestamp() + 0.003
        self.mono = 0.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.wall, UTC)

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


class HandOverSink:
    """Records (the manager's clock, nominal time) of every fire the manager hands over."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.handed: list[tuple[float, datetime]] = []

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None:
        self.handed.extend((self.clock.time(), at) for at in run_times)

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None: ...

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None: ...


def run_lookahead(manager: SchedulerManager, clock: FakeClock, seconds: float) -> list[float]:
    """Drive the look-ahead for ``seconds`` of the fake clock, waking when it asks to (what its
    loop timer does); returns the clock at each wake-up. Nothing awaits in between, so the
    scheduler's own timer never runs meanwhile."""
    scheduler: Any = manager.scheduler
    until = clock.time() + seconds
    wakeups = []
    while clock.time() < until:
        wakeups.append(clock.time())
        wait_s = scheduler._process_jobs()
        clock.advance(HANDOVER_TICK_S if wait_s is None else max(wait_s, 0.001))
    return wakeups


async def test_manager_hands_fires_over_lookahead_s_early_with_nominal_times() -> None:
    clock = FakeClock()
    sink = HandOverSink(clock)
    handed = sink.handed
    defaults = JobDefaults.from_settings(SchedulerSettings(), "cron_queue")
    started = clock.time()
    async with SchedulerManager(defaults, sink, lookahead_s=1.0, clock=clock) as manager:
        manager.register_interval("tick", "demo.sleep", 0.25)
        run_lookahead(manager, clock, 3.0)
        next_fire = manager.next_fire_time("tick")
    assert len(handed) >= 10
    assert next_fire is not None and next_fire.microsecond % 250_000 == 0  # nominal, not shifted
    # Every nominal fire up to the last handed over, once, in order.
    times = [at.timestamp() for _, at in handed]
    assert times == [times[0] + 0.25 * i for i in range(len(times))]
    for handed_at, at in handed:
        assert at.microsecond % 250_000 == 0
        # The look-ahead ramps up from 0 over its first second, then hands over up to 1 s ahead.
        assert at.timestamp() - handed_at <= min(1.0, handed_at - started) + 1e-6
    steady = [(handed_at, at) for handed_at, at in handed if handed_at > started + 1.2]
    assert steady
    assert all(handed_at < at.timestamp() for handed_at, at in steady)  # ahead of its time


async def test_manager_hands_fires_over_in_ticks_not_once_per_fire_time() -> None:
    """200 jobs a second, each at its own instant: the manager wakes about every
    HANDOVER_TICK_S and hands over everything inside the look-ahead, not once per fire time;
    every fire still arrives at least half the look-ahead before it is due."""
    clock = FakeClock()
    sink = HandOverSink(clock)
    handed = sink.handed
    defaults = JobDefaults.from_settings(SchedulerSettings(), "cron_queue")
    async with SchedulerManager(defaults, sink, lookahead_s=1.0, clock=clock) as manager:
        epoch = datetime(2020, 1, 1, tzinfo=UTC)
        for i in range(200):
            manager.register_interval(f"j{i}", "demo.sleep", 1.0, start_date=epoch + timedelta(milliseconds=5 * i))
        started = clock.time()
        wakeups = run_lookahead(manager, clock, 3.5)
    steady = [(handed_at, at) for handed_at, at in handed if handed_at > started + 1.5]
    assert len(steady) > 300
    assert all(at.timestamp() - handed_at >= 0.5 for handed_at, at in steady)
    handing = {handed_at for handed_at, _ in steady}
    assert len(handing) <= 2.0 / HANDOVER_TICK_S + 5, f"{len(handing)} hand-overs in 2 s"
    assert len([t for t in wakeups if t > started + 1.5]) <= 2.0 / HANDOVER_TICK_S + 5


def test_heap_job_store_orders_updates_and_removes() -> None:
    class FakeJob:
        def __init__(self, id: str, at: datetime | None) -> None:
            self.id, self.next_run_time = id, at

    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    store = HeapJobStore()
    jobs = {name: FakeJob(name, t0 + timedelta(seconds=s)) for name, s in (("c", 3), ("a", 1), ("b", 2), ("d", 4))}
    for job in jobs.values():
        store.add_job(job)
    assert [j.id for j in store.get_all_jobs()] == ["a", "b", "c", "d"]
    jobs["a"].next_run_time = t0 + timedelta(seconds=10)
    store.update_job(jobs["a"])
    store.remove_job("b")
    assert store.get_next_run_time() == t0 + timedelta(seconds=3)
    due = store.pop_due((t0 + timedelta(seconds=5)).timestamp(), limit=1)
    assert [j.id for j in due] == ["c"]  # the stale entries of a and b are skipped
    jobs["c"].next_run_time = t0 + timedelta(seconds=20)
    store.update_job(jobs["c"])
    assert [j.id for j in store.pop_due((t0 + timedelta(seconds=15)).timestamp(), limit=10)] == ["d", "a"]
    for job_id in ("d", "a"):
        store.remove_job(job_id)
    assert [j.id for j in store.get_all_jobs()] == ["c"]
    assert store.get_next_run_time() == t0 + timedelta(seconds=20)


async def test_a_fire_that_comes_after_its_jobs_catch_up_is_coalesced_into_it() -> None:
    ledger, encoder = FakeLedger(), FakeEncoder()
    d = dispatcher(ledger, encoder)
    d.start()
    now = datetime.now(UTC)
    backlog, ordinary = spec(id="backlog", coalesce=True), spec(id="ordinary", coalesce=True)
    d.submit(backlog, [now - timedelta(seconds=3), now - timedelta(seconds=2)])
    d.submit(ordinary, [now - timedelta(seconds=0.01)])
    await wait_until(lambda: len(ledger.log) == 3)
    assert set(d.last_dispatch) == {"backlog"}  # only a catch-up is remembered
    # A fire of the backlog that reached the dispatcher only now (held as a backup, say).
    d.submit(backlog, [now - timedelta(seconds=1)])
    await wait_until(lambda: len(ledger.log) == 4)
    (catch_up,) = [i for _, i in ledger.log if i.job_id == "backlog" and i.outcome is Outcome.DISPATCHED]
    late = ledger.log[-1][1]
    assert (late.outcome, late.reason) == (Outcome.COALESCED, f"coalesced into {catch_up.scheduled_at}")
    assert await d.drain(timeout_s=2)
