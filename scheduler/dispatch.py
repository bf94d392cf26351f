"""From "a trigger fired" to "a message is on the queue": plan, hold, prepare, decide.

Each nominal fire of a job ends as exactly one outcome, decided once for the whole fleet by
the ledger (:meth:`shared.fleet.FireLedger.decide`: one Lua call per batch, which also
publishes). Which outcome and when is the planner's business (:mod:`scheduler.planner`, with
its rule table); this module only moves fires along the pipeline::

    submit ─ plan_due ─> Preparer (encode ahead) ─> Timeline (wait for release) ─> queue
    queue ─ replan (state, grace, coalesce) ─> lanes ─> decided? (backups) ─> ledger.decide

Every replica runs every job. The leader handles a fire when it is due; the others handle it
``takeover_s`` later, which costs one cheap check when the leader did its job and publishes it
when the leader is gone. When Redis is down the batch is retried with backoff, and everything
that comes due meanwhile joins it, so the whole backlog is re-planned (and coalesced) together
when Redis comes back. Nothing is ever published before its nominal time plus its jitter; at
shutdown, fires not yet due are dropped rather than published early, and the next scheduler's
catch-up (or a follower's takeover) handles them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import redis
from loguru import logger

from scheduler.decisionlog import DecisionLog
from scheduler.fires import SCHEDULE, Fire, Limits
from scheduler.planner import (
    REDIS_CAME_BACK_LATE,
    JobState,
    LastDispatch,
    plan_due,
    plan_missed,
    promoted_release,
    replan,
)
from scheduler.timeline import Encoder, Preparer, Timeline
from shared.clock import SYSTEM_CLOCK, Clock
from shared.errors import DispatchError, NotReplicatedError
from shared.fleet import FireIntent, Outcome
from shared.redis import raise_if_cancelling

if TYPE_CHECKING:
    from scheduler.events import SentEvents
    from scheduler.metrics import ReplicaMetrics
    from scheduler.specs import JobSpec

__all__ = ["Dispatcher", "Encoder", "Ledger", "Limits"]

_RETRYABLE = (redis.RedisError, OSError, DispatchError)
DECIDE_LANES = 2
"""Past one batch of fires ready at once (a burst), they are decided in this many lanes at once,
each for its own share of the jobs (so a job's fires stay in order): while Redis runs one
lane's script, another lane's batch is built and sent. A steady stream is one call per turn."""
ANNOUNCE_DEFER_MAX_S = 1.0
"""Task-sent events wait at most this long for a burst of fires to be decided first."""
LAST_DISPATCH_KEPT_S = 600.0
"""A job's last catch-up is remembered this long for the coalesce rule "overdue at the last
catch-up" (then forgotten, so removed jobs leave nothing behind)."""


class Ledger(Protocol):
    """Decides fires fleet-wide (:class:`shared.fleet.FireLedger`, or a recorder in tests)."""

    def decide(self, fires: Sequence[FireIntent], owner: str) -> Awaitable[Sequence[Any]]:
        """Per fire: the outcome this call decided, or ``decided`` if another call had."""
        ...

    def decided(self, fires: Sequence[tuple[str, str]]) -> Awaitable[Sequence[Any]]:
        """Per (job id, scheduled_at): 1 if decided already, else 0."""
        ...


class Dispatcher:
    """Decides and publishes fires. Create it, ``start()`` it inside a running loop, feed it
    with :meth:`submit`, and ``await drain()`` at shutdown."""

    def __init__(
        self,
        ledger: Ledger,
        encoder: Encoder,
        owner: str,
        limits: Limits,
        *,
        batch_size: int = 500,
        takeover_s: float = 2.0,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Clock = SYSTEM_CLOCK,
        max_backoff_s: float = 2.0,
        lanes: int = DECIDE_LANES,
        metrics: ReplicaMetrics | None = None,
        events: SentEvents | None = None,
    ) -> None:
        self.ledger = ledger
        self.owner = owner
        self.limits = limits
        self.batch_size = batch_size
        self.takeover_s = takeover_s
        self.is_leader = is_leader
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self.lanes = max(1, lanes)
        self.metrics = metrics
        self.events = events
        """Announces dispatched fires to Celery's event stream (``task-sent``), when enabled."""
        self.job_state: JobState | None = None
        """Set by the service to :meth:`SchedulerManager.job_state`: a pause, resume or removal
        that lands between a fire's hand-over (look-ahead) and its due time still applies."""
        self.last_dispatch: dict[str, LastDispatch] = {}
        """Per coalescing job, its newest catch-up dispatched here: a fire of it that was due
        before then and comes late is coalesced into it (:func:`scheduler.planner.replan`)."""
        self._last_dispatch_pruned = 0.0
        self.log = DecisionLog(clock)
        self.outcomes = self.log.outcomes
        self.timeline = Timeline(clock, self._release)
        self.preparer = Preparer(encoder, limits, clock, self._prepared, batch_size=batch_size)
        self._queue: asyncio.Queue[Fire] = asyncio.Queue()
        self._pending: list[Fire] = []
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._unannounced: deque[tuple[list[Fire], float]] = deque()
        """Dispatched fires whose task-sent events are still to be published (off the decide path)."""
        self._announce_wake = asyncio.Event()
        self._announcer: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="chronoq-dispatch")
        if self.events is not None:
            self._announcer = loop.create_task(self._announce_loop(), name="chronoq-task-sent")

    # -- intake (on the event loop, never blocking) -------------------------------------------

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None:
        """Take nominal fire times of ``job`` that are due, or will be within the look-ahead."""
        self._plan(job, run_times, paused=False)

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None:
        """Fires of a paused job: recorded skipped once due."""
        self._plan(job, run_times, paused=True)

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None:
        """Fires that came due while no scheduler ran and are past their grace."""
        now = self.clock.now()
        for fire in plan_missed(job, times, reason, now):
            self._accept(fire, now.timestamp())

    def _plan(self, job: JobSpec, run_times: Sequence[datetime], *, paused: bool) -> None:
        now = self.clock.now()
        now_ts = now.timestamp()
        leader = self.is_leader()
        for fire in plan_due(job, run_times, now, leader=leader, takeover_s=self.takeover_s, paused=paused):
            self._accept(fire, now_ts)

    def _accept(self, fire: Fire, now_ts: float) -> None:
        self._idle.clear()
        if fire.outcome is Outcome.DISPATCHED and not fire.backup and fire.release_ts > now_ts:
            self.preparer.add(fire, now_ts)  # a follower's fire is encoded only if the leader did not decide it
        elif not self.timeline.add(fire, now_ts):
            self._queue.put_nowait(fire)

    def _prepared(self, fire: Fire) -> None:
        now_ts = self.clock.time()
        if not self._closing:
            if not self.timeline.add(fire, now_ts):
                self._queue.put_nowait(fire)
        elif fire.scheduled_at.timestamp() <= now_ts:
            self._queue.put_nowait(fire)
        self._check_idle()

    def _release(self, fires: list[Fire]) -> None:
        for fire in fires:
            self._queue.put_nowait(fire)

    def promote(self) -> None:
        """This replica just became the leader: fires it holds as a backup (handed over ahead of
        time while it followed) are moved to their own due time. Each is still checked first,
        in case the old leader decided it before it left."""
        now_ts = self.clock.time()
        backups = list(self.timeline.take(lambda fire: fire.backup))
        for fire in backups:
            fire.release_ts = promoted_release(fire, fire.release_ts)
            self._accept(fire, now_ts)
        if backups:
            logger.info("now the leader: {} fires held as backups move to their due time", len(backups))

    # -- deciding ------------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        attempt = 0
        while True:
            raise_if_cancelling()
            if not self._pending:
                self._pending.append(await queue.get())
            # After a failure, everything that came due meanwhile joins the retry, so a backlog
            # is re-planned together (one dispatch per coalescing job) when Redis comes back.
            limit = self.batch_size * self.lanes
            while (attempt or len(self._pending) < limit) and not queue.empty():
                self._pending.append(queue.get_nowait())
            late = REDIS_CAME_BACK_LATE if attempt else None
            fires = replan(
                self._pending, self.clock.now(), self.job_state, late_reason=late, dispatched=self.last_dispatch
            )
            failed, error = await self._decide_in_lanes(fires)
            self._pending = failed
            if error is None:
                attempt = 0
                self._check_idle()
                continue
            attempt += 1
            if self.metrics is not None:
                self.metrics.decide_retries.inc()
                self.metrics.redis_errors.labels("decide").inc()
            delay = min(self.max_backoff_s, 0.05 * 2**attempt)
            # Replicas missing is reported once by shared.durability: only the first try here.
            quiet = isinstance(error, NotReplicatedError) and attempt > 1
            (logger.debug if quiet else logger.warning)(
                "dispatch failed (attempt {}), retrying in {:.2f}s: {}", attempt, delay, error
            )
            await asyncio.sleep(delay)

    async def _decide_in_lanes(self, fires: list[Fire]) -> tuple[list[Fire], BaseException | None]:
        """Decide ``fires``; returns those not decided because Redis failed, and the error."""
        if len(fires) <= self.batch_size or self.lanes == 1:
            return await self._decide_lane(fires)
        lanes: list[list[Fire]] = [[] for _ in range(self.lanes)]
        for fire in fires:
            lanes[hash(fire.job.id) % self.lanes].append(fire)
        done = await asyncio.gather(*(self._decide_lane(lane) for lane in lanes if lane))
        failed = [fire for lane_failed, _ in done for fire in lane_failed]
        return failed, next((error for _, error in done if error is not None), None)

    async def _decide_lane(self, fires: list[Fire]) -> tuple[list[Fire], BaseException | None]:
        for start in range(0, len(fires), self.batch_size):
            try:
                await self._decide(fires[start : start + self.batch_size])
            except _RETRYABLE as exc:
                raise_if_cancelling()
                return fires[start:], exc
        return [], None

    async def _decide(self, fires: list[Fire]) -> None:
        backups = [f for f in fires if f.backup]
        if backups:
            # A follower's fires: most were decided by the leader already; skip encoding those.
            flags = await self.ledger.decided([(f.job.id, f.stamp) for f in backups])
            decided = {id(f) for f, flag in zip(backups, flags, strict=True) if int(flag)}
            fires = [f for f in fires if id(f) not in decided]
            if not fires:
                return
        now = self.clock.now()
        to_send = [f for f in fires if f.outcome is Outcome.DISPATCHED and f.prepared is None]
        fresh = dict(zip(map(id, to_send), await self.preparer.encode(to_send, now), strict=True))
        intents = [f.prepared or fresh.get(id(f)) or f.intent(now, self.limits) for f in fires]
        sent_ts, started = self.clock.time(), self.clock.monotonic()  # a worker may receive one at once
        results = [str(r) for r in await self.ledger.decide(intents, self.owner)]
        done_ts = self.clock.time()
        self.log.record(fires, results, now)
        self._remember_dispatches(fires, results, done_ts)
        if self.metrics is not None:
            self.metrics.observe_decide(fires, results, self.clock.monotonic() - started, done_ts)
        if self.events is not None:
            dispatched = [f for f, r in zip(fires, results, strict=True) if r == Outcome.DISPATCHED]
            if dispatched:
                self._unannounced.append((dispatched, sent_ts))
                self._announce_wake.set()

    async def _announce_loop(self) -> None:
        """Publishes the task-sent events of dispatched fires once nothing waits to be decided
        (or :data:`ANNOUNCE_DEFER_MAX_S` later): a burst is published first, then announced."""
        while True:
            await self._announce_wake.wait()
            self._announce_wake.clear()
            deadline = self.clock.monotonic() + ANNOUNCE_DEFER_MAX_S
            while (self._pending or not self._queue.empty()) and self.clock.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await self._announce_waiting()

    async def _announce_waiting(self) -> None:
        while self._unannounced:
            fires, sent_ts = self._unannounced.popleft()
            await self._announce(fires, sent_ts)

    async def _announce(self, fires: list[Fire], now_ts: float) -> None:
        """Celery's task-sent events for fires just published. Never raises a Redis error: the
        fires are decided, and a retry would decide them again (as ``decided``)."""
        assert self.events is not None
        try:
            sent = await self.events.publish(fires, now_ts)
        except (redis.RedisError, OSError) as exc:
            raise_if_cancelling()
            logger.warning("task-sent events for {} fires not published: {}", len(fires), exc)
            if self.metrics is not None:
                self.metrics.redis_errors.labels("events").inc()
            return
        if self.metrics is not None and sent:
            self.metrics.sent_events.inc(sent)

    def _remember_dispatches(self, fires: list[Fire], results: list[str], now_ts: float) -> None:
        last = self.last_dispatch
        for fire, result in zip(fires, results, strict=True):
            if fire.catch_up and result == Outcome.DISPATCHED.value and fire.trigger == SCHEDULE:
                known = last.get(fire.job.id)
                if known is None or known.scheduled_at < fire.scheduled_at:
                    last[fire.job.id] = LastDispatch(fire.scheduled_at, now_ts, fire.stamp)
        if now_ts - self._last_dispatch_pruned > LAST_DISPATCH_KEPT_S / 10:
            self._last_dispatch_pruned = now_ts
            for job_id in [j for j, d in last.items() if now_ts - d.decided_ts > LAST_DISPATCH_KEPT_S]:
                del last[job_id]

    def _check_idle(self) -> None:
        if not (self._pending or self.preparer or self.timeline) and self._queue.empty():
            self._idle.set()

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Decide every fire that is due (jitter and takeover waits cut short), then stop.

        Fires handed over ahead of their time and not yet due are dropped, never published
        early: a follower takes them over, and a restarted scheduler's catch-up hands them over
        again (or records them missed past their grace). Returns False if it could not finish
        within ``timeout_s``."""
        self._closing = True
        now_ts = self.clock.time()
        dropped = 0
        for fire in [*self.preparer.take_waiting(), *self.timeline.take(lambda _: True)]:
            if fire.scheduled_at.timestamp() <= now_ts:
                self._idle.clear()
                self._queue.put_nowait(fire)
            else:
                dropped += 1
        if dropped:
            logger.info("shutdown: {} fires not yet due are left to the next scheduler", dropped)
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            finished = True
        except TimeoutError:
            finished = False
            undecided = self._queue.qsize() + len(self._pending)
            logger.error("shutdown: {} fires still undecided after {}s", undecided, timeout_s)
        self.log.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        if self._announcer is not None:
            self._announcer.cancel()
            await asyncio.wait([self._announcer], timeout=1.0)
            with contextlib.suppress(TimeoutError):  # best effort, as the events are
                await asyncio.wait_for(self._announce_waiting(), 1.0)
        return finished
