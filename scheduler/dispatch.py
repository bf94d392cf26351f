"""From "a trigger fired" to "a message is on the queue": classify, encode, decide atomically.

Each nominal fire of a job ends as exactly one outcome, decided once for the whole fleet by
:meth:`shared.fleet.FireLedger.decide` (one Lua call per batch, which also publishes):

- **missed**: later than the job's misfire grace when it came due (or when Redis came back);
- **coalesced**: one of several fires due at once for a ``coalesce`` job; only the newest runs;
- **skipped**: the job is paused, or ``max_instances`` of it are in flight (overlap ``skip``);
- **dispatched**: published to the job's queue (or, overlap ``buffer_one``, when a slot frees).

Every replica runs every job. The leader handles a fire when it is due; the others handle it
``takeover_s`` later, which costs one cheap check when the leader did its job and publishes it
when the leader is gone. Jitter (0..jitter s) is derived from the fire itself, so every replica
waits the same; ``scheduled_at`` stays the nominal time and the schedule never drifts.

When Redis is down a batch is retried with backoff until each fire's grace runs out; a fire past
it is then decided as missed.

Fires usually arrive ``lookahead_s`` before they are due (see :mod:`scheduler.manager`). The
leader's are *prepared* then: message built and encoded, in batches, so at
the due instant (plus jitter) only the decide call is left. Nothing is ever published before
its nominal time plus its jitter; at shutdown, fires not yet due are dropped rather than
published early, and the next scheduler's catch-up (or a follower's takeover) handles them.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import redis
from loguru import logger

from scheduler.publisher import TaskMessage
from shared.errors import DispatchError
from shared.fleet import FireIntent, FireLedger, Outcome, Overlap
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID, fire_task_id_of, format_scheduled_at
from shared.redis import raise_if_cancelling

if TYPE_CHECKING:
    from scheduler.specs import JobSpec
    from shared.settings import AppSettings

_RETRYABLE = (redis.RedisError, OSError, DispatchError)
PAUSED = "paused"
QUIET_BATCH = 20
"""Past this many fires decided in one second, fires are logged as one summary line a second."""
PREPARE_EVERY_S = 0.05
"""Fires handed over ahead of time are prepared in batches collected over this long: one task
per batch instead of one per fire."""
PREPARE_MARGIN_S = 0.25
"""A fire due sooner than this is prepared at once instead of waiting for its batch."""
ENCODE_CHUNK = 100
"""Fires encoded per turn of the event loop (about 2 ms of work). Encoding runs on the loop: it
costs ~15 µs a message from a template, less than handing it to a thread and waiting for the
GIL to come back."""
DECIDE_LANES = 2
"""Past one batch of fires ready at once (a burst), they are decided in this many lanes at once,
each for its own share of the jobs (so a job's fires stay in order): while Redis runs one
lane's script, another lane's batch is built and sent. A steady stream is one call per turn."""
RELEASE_TICK_S = 0.005
"""Fires are released on a 5 ms grid (rounded up, never early): at 1,000 fires a second spread
over the second, one decide call and one timer per 5 fires instead of per fire."""


def release_tick(release_ts: float) -> float:
    """``release_ts`` rounded up to the release grid."""
    return math.ceil(release_ts / RELEASE_TICK_S) * RELEASE_TICK_S


def utc_now() -> datetime:
    return datetime.now(UTC)


class Encoder(Protocol):
    """Turns task messages into (broker list key, payload); pure CPU, run on the loop in chunks."""

    def encode(self, messages: Sequence[TaskMessage]) -> list[tuple[str, str]]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Fleet-wide defaults a fire's message and slot need."""

    time_limit_s: int
    soft_time_limit_s: int | None = None
    slot_margin_s: int = 30
    max_queue_wait_s: int = 3600
    """A slot of a message without ``expires`` lapses after this wait plus the time limit."""

    @classmethod
    def from_settings(cls, settings: AppSettings) -> Limits:
        return cls(
            time_limit_s=settings.celery.task_time_limit_s or 1800,
            soft_time_limit_s=settings.celery.task_soft_time_limit_s,
            slot_margin_s=settings.scheduler.slot_margin_s,
            max_queue_wait_s=settings.celery.visibility_timeout_s,
        )


def deadline_of(job: JobSpec, scheduled_at: datetime) -> datetime | None:
    """After this a fire is too late to run (None: no limit)."""
    grace = job.misfire_grace_time
    return None if grace is None else scheduled_at + timedelta(seconds=grace)


def jitter_of(job: JobSpec, scheduled_at: datetime) -> float:
    """The fire's dispatch delay in 0..jitter s: pseudo-random per fire, the same on every replica."""
    if not job.jitter:
        return 0.0
    digest = hashlib.blake2b(f"{job.id}|{scheduled_at.isoformat()}".encode(), digest_size=8).digest()
    return job.jitter * int.from_bytes(digest) / 2**64


@dataclass(slots=True)
class Fire:
    """One nominal fire of one job, waiting to be decided."""

    job: JobSpec
    scheduled_at: datetime
    outcome: Outcome = Outcome.DISPATCHED
    reason: str = ""
    trigger: str = "schedule"
    backup: bool = False
    """Handled as a follower: the leader has probably decided it already."""
    force: bool = False
    """A manual trigger that ignores the overlap policy."""
    prepared: FireIntent | None = None
    """The fire encoded ahead of its time, ready to decide."""
    _stamp: str = field(default="", repr=False)
    _task_id: str = field(default="", repr=False)

    @property
    def stamp(self) -> str:
        """``scheduled_at`` as the header and the keys spell it (computed once)."""
        if not self._stamp:
            self._stamp = format_scheduled_at(self.scheduled_at)
        return self._stamp

    @property
    def task_id(self) -> str:
        if not self._task_id:
            self._task_id = fire_task_id_of(self.job.id, self.stamp)
        return self._task_id

    def deadline(self) -> datetime | None:
        return deadline_of(self.job, self.scheduled_at)

    def expires_s(self, now: datetime) -> float | None:
        # A message that sits in a backlog past this must not run: the job's own expiry, else
        # its misfire grace, counted from the nominal fire time.
        expires = self.job.expires if self.job.expires is not None else self.job.misfire_grace_time
        return None if expires is None else max(1.0, self.scheduled_at.timestamp() - now.timestamp() + expires)

    def message(self, now: datetime, limits: Limits, expires_s: float | None = None) -> TaskMessage:
        """The fire's task message; ``expires_s`` is :meth:`expires_s` when the caller has it."""
        task_id = self.task_id
        job = self.job
        return TaskMessage(
            task_name=job.task,
            args=job.args,  # read, never changed, by the encoder
            kwargs=job.kwargs,
            queue=job.queue,
            task_id=task_id,
            headers={HEADER_JOB_ID: job.id, HEADER_SCHEDULED_AT: self.stamp, HEADER_TRACE_ID: task_id},
            priority=job.priority,
            expires_s=self.expires_s(now) if expires_s is None else expires_s,
            time_limit_s=job.time_limit or limits.time_limit_s,
            soft_time_limit_s=job.soft_time_limit or limits.soft_time_limit_s,
        )

    def intent(
        self,
        now: datetime,
        limits: Limits,
        encoded: tuple[str, str] | None = None,
        expires_s: float | None = None,
    ) -> FireIntent:
        """The fire as the ledger decides it; ``encoded`` is its (list key, payload)."""
        job = self.job
        expires = self.expires_s(now) if expires_s is None else expires_s
        wait_s = limits.max_queue_wait_s if expires is None else expires
        lapse_s = wait_s + (job.time_limit or limits.time_limit_s) + limits.slot_margin_s
        grace = job.misfire_grace_time
        list_key, payload = encoded or ("", "")
        return FireIntent(
            job_id=job.id,
            scheduled_at=self.stamp,
            task_id=self.task_id,
            outcome=self.outcome,
            reason=self.reason,
            trigger=self.trigger,
            max_instances=job.max_instances,
            overlap=Overlap.ALLOW if self.force else _OVERLAPS[job.overlap],
            slot_lapse_ms=int(lapse_s * 1000),
            deadline_ms=0 if grace is None else int((self.scheduled_at.timestamp() + grace) * 1000),
            list_key=list_key,
            payload=payload,
        )


_OVERLAPS = {overlap.value: overlap for overlap in Overlap}


class Dispatcher:
    """Decides and publishes fires. Create it, ``start()`` it inside a running loop, feed it
    with :meth:`submit`, and ``await drain()`` at shutdown."""

    def __init__(
        self,
        ledger: FireLedger,
        encoder: Encoder,
        owner: str,
        limits: Limits,
        *,
        batch_size: int = 500,
        takeover_s: float = 2.0,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], datetime] = utc_now,
        max_backoff_s: float = 2.0,
        lanes: int = DECIDE_LANES,
    ) -> None:
        self.ledger = ledger
        self.encoder = encoder
        self.owner = owner
        self.limits = limits
        self.batch_size = batch_size
        self.takeover_s = takeover_s
        self.is_leader = is_leader
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self.job_state: Callable[[JobSpec], str] | None = None
        """Set by the service to :meth:`SchedulerManager.job_state`: a pause, resume or removal
        that lands between a fire's hand-over (look-ahead) and its due time still applies."""
        self.outcomes: Counter[str] = Counter()
        """Outcomes this replica decided (the fleet's are in Redis)."""
        self._queue: asyncio.Queue[Fire] = asyncio.Queue()
        self.lanes = max(1, lanes)
        # Fires waiting for their release instant (epoch s: due + jitter [+ takeover]), grouped by
        # it, one timer per group: a burst due at one instant is one timer, not 10,000.
        self._timeline: dict[float, list[Fire]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self._to_prepare: list[tuple[Fire, float]] = []
        self._prepare_timer: asyncio.Handle | None = None
        self._preparing = 0
        self._busy = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._log_window_s = 0.0
        self._log_count = 0
        self._summary: Counter[str] = Counter()
        self._summary_lags: list[float] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="chronoq-dispatch")

    # -- intake (on the event loop, never blocking) -------------------------------------------

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None:
        """Take nominal fire times of ``job`` that are due, or will be within the look-ahead."""
        now = self.clock()
        now_ts = now.timestamp()
        due: list[datetime] = []
        for at in run_times:
            deadline = deadline_of(job, at)
            if deadline is not None and now > deadline:
                late = f"{(now - at).total_seconds():.1f}s late, grace {job.misfire_grace_time}s"
                self._enqueue(Fire(job, at, Outcome.MISSED, late))
            else:
                due.append(at)
        # Only fires already due coalesce: one handed over ahead of its time is not late.
        overdue = [at for at in due if at <= now]
        if job.coalesce and len(overdue) > 1:
            for at in overdue[:-1]:
                self._enqueue(Fire(job, at, Outcome.COALESCED, f"coalesced into {format_scheduled_at(overdue[-1])}"))
            due = [at for at in due if at >= overdue[-1]]
        backup = not self.is_leader()
        for at in due:
            fire = Fire(job, at, backup=backup)
            release_ts = release_tick(at.timestamp() + jitter_of(job, at) + (self.takeover_s if backup else 0.0))
            if backup or release_ts <= now_ts:
                # A follower's fire is most likely decided by the leader already: it is checked
                # at its release, and encoded only if not.
                self._schedule(fire, release_ts, now_ts)
            else:
                self._add_to_prepare(fire, release_ts, now_ts)

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None:
        """Fires that came due while no scheduler ran and are past their grace."""
        for at in times:
            self._enqueue(Fire(job, at, Outcome.MISSED, reason))

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None:
        """Fires that come due but are not to run (the job is paused); recorded once due."""
        backup = not self.is_leader()
        now_ts = self.clock().timestamp()
        for at in run_times:
            fire = Fire(job, at, Outcome.SKIPPED, reason, backup=backup)
            self._schedule(fire, release_tick(at.timestamp() + (self.takeover_s if backup else 0.0)), now_ts)

    def _enqueue(self, fire: Fire) -> None:
        self._idle.clear()
        self._queue.put_nowait(fire)

    def _schedule(self, fire: Fire, release_ts: float, now_ts: float) -> None:
        """Decide ``fire`` at ``release_ts`` (epoch s), never before."""
        delay_s = release_ts - now_ts
        if delay_s <= 0:
            self._enqueue(fire)
            return
        self._idle.clear()
        group = self._timeline.get(release_ts)
        if group is not None:
            group.append(fire)
            return
        self._timeline[release_ts] = [fire]
        self._timers[release_ts] = asyncio.get_running_loop().call_later(delay_s, self._release, release_ts)

    def _release(self, release_ts: float) -> None:
        # The loop's timers run on the monotonic clock; the fire's time is wall-clock time.
        early_s = release_ts - self.clock().timestamp()
        if early_s > 0:
            self._timers[release_ts] = asyncio.get_running_loop().call_later(early_s, self._release, release_ts)
            return
        del self._timers[release_ts]
        for fire in self._timeline.pop(release_ts):
            self._queue.put_nowait(fire)

    def promote(self) -> None:
        """This replica just became the leader: fires it holds as a backup (handed over ahead of
        time while it followed) are moved to their own due time. Each is still checked first,
        in case the old leader decided it before it left."""
        now_ts = self.clock().timestamp()
        moved = 0
        for release_ts in list(self._timeline):
            group = self._timeline[release_ts]
            backups = [fire for fire in group if fire.backup]
            if not backups:
                continue
            kept = [fire for fire in group if not fire.backup]
            if kept:
                self._timeline[release_ts] = kept
            else:
                del self._timeline[release_ts]
                self._timers.pop(release_ts).cancel()
            for fire in backups:
                due = release_tick(fire.scheduled_at.timestamp() + jitter_of(fire.job, fire.scheduled_at))
                self._schedule(fire, min(due, release_ts), now_ts)
                moved += 1
        if moved:
            logger.info("now the leader: {} fires held as backups move to their due time", moved)

    # -- preparing ahead of time ---------------------------------------------------------------

    def _add_to_prepare(self, fire: Fire, release_ts: float, now_ts: float) -> None:
        self._idle.clear()
        self._to_prepare.append((fire, release_ts))
        loop = asyncio.get_running_loop()
        if len(self._to_prepare) >= self.batch_size or release_ts - now_ts < PREPARE_MARGIN_S:
            if self._prepare_timer is not None:
                self._prepare_timer.cancel()
            self._prepare_timer = loop.call_soon(self._start_preparing)
        elif self._prepare_timer is None:
            self._prepare_timer = loop.call_later(PREPARE_EVERY_S, self._start_preparing)

    def _start_preparing(self) -> None:
        self._prepare_timer = None
        batch, self._to_prepare = self._to_prepare, []
        if batch:
            self._preparing += 1
            asyncio.get_running_loop().create_task(self._prepare(batch), name="chronoq-prepare")

    async def _prepare(self, batch: list[tuple[Fire, float]]) -> None:
        try:
            fires = [fire for fire, _ in batch]
            for fire, intent in zip(fires, await self._encode_intents(fires, self.clock()), strict=True):
                fire.prepared = intent
        except Exception as exc:  # a bad message: decided (and reported) unprepared, at its time
            logger.warning("preparing {} fires ahead of time failed: {}", len(batch), exc)
        finally:
            self._preparing -= 1
        now_ts = self.clock().timestamp()
        for fire, release_ts in batch:
            if not self._closing:
                self._schedule(fire, release_ts, now_ts)
            elif fire.scheduled_at.timestamp() <= now_ts:
                self._enqueue(fire)
        self._check_idle()

    async def _encode_intents(self, fires: list[Fire], now: datetime) -> list[FireIntent]:
        """Each fire's message, encoded, as the ledger will decide it; ENCODE_CHUNK fires per
        turn of the loop, so fires due meanwhile are released between chunks."""
        intents: list[FireIntent] = []
        for start in range(0, len(fires), ENCODE_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = fires[start : start + ENCODE_CHUNK]
            expires = [fire.expires_s(now) for fire in chunk]
            messages = [f.message(now, self.limits, e) for f, e in zip(chunk, expires, strict=True)]
            encoded = self.encoder.encode(messages)
            intents += [f.intent(now, self.limits, p, e) for f, p, e in zip(chunk, encoded, expires, strict=True)]
        return intents

    # -- deciding ------------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        while True:
            raise_if_cancelling()
            ready = [await queue.get()]
            while len(ready) < self.batch_size * self.lanes and not queue.empty():
                ready.append(queue.get_nowait())
            self._busy += 1
            try:
                if len(ready) <= self.batch_size or self.lanes == 1:
                    await self._process(ready)
                else:
                    lanes: list[list[Fire]] = [[] for _ in range(self.lanes)]
                    for fire in ready:
                        lanes[hash(fire.job.id) % self.lanes].append(fire)
                    await asyncio.gather(*(self._process_lane(lane) for lane in lanes if lane))
            finally:
                self._busy -= 1
            self._check_idle()

    async def _process_lane(self, fires: list[Fire]) -> None:
        for start in range(0, len(fires), self.batch_size):
            await self._process(fires[start : start + self.batch_size])

    def _check_idle(self) -> None:
        busy = self._busy or self._preparing or self._to_prepare or self._timeline
        if not busy and self._queue.empty():
            self._idle.set()

    async def _process(self, fires: list[Fire]) -> None:
        attempt = 0
        while fires:
            try:
                await self._decide(fires)
                return
            except _RETRYABLE as exc:
                raise_if_cancelling()
                attempt += 1
                delay = min(self.max_backoff_s, 0.05 * 2**attempt)
                logger.warning("dispatch failed (attempt {}), retrying in {:.2f}s: {}", attempt, delay, exc)
                await asyncio.sleep(delay)
                fires = [self._past_grace(f) for f in fires]

    def _past_grace(self, fire: Fire) -> Fire:
        deadline = fire.deadline()
        if fire.outcome is Outcome.DISPATCHED and deadline is not None and self.clock() > deadline:
            return Fire(
                fire.job,
                fire.scheduled_at,
                Outcome.MISSED,
                "Redis unavailable until past its grace",
                fire.trigger,
                fire.backup,
            )
        return fire

    def _as_due(self, fire: Fire) -> Fire | None:
        """The fire as it stands at its due time: the job may have been paused, resumed or
        removed since it was handed over."""
        if self.job_state is None or fire.trigger != "schedule":
            return fire
        paused_skip = fire.outcome is Outcome.SKIPPED and fire.reason == PAUSED
        if fire.outcome is not Outcome.DISPATCHED and not paused_skip:
            return fire
        state = self.job_state(fire.job)
        if state == "gone":
            return None
        if state == "paused" and not paused_skip:
            return Fire(fire.job, fire.scheduled_at, Outcome.SKIPPED, PAUSED, backup=fire.backup)
        if state == "active" and paused_skip:
            return Fire(fire.job, fire.scheduled_at, backup=fire.backup)
        return fire

    async def _decide(self, fires: list[Fire]) -> None:
        fires = [due for due in map(self._as_due, fires) if due is not None]
        if not fires:
            return
        backups = [f for f in fires if f.backup]
        if backups:
            # A follower's fires: most were decided by the leader already; skip encoding those.
            flags = await self.ledger.decided([(f.job.id, f.stamp) for f in backups])
            decided = {id(f) for f, flag in zip(backups, flags, strict=True) if int(flag)}
            fires = [f for f in fires if id(f) not in decided]
            if not fires:
                return
        now = self.clock()
        to_send = [f for f in fires if f.outcome is Outcome.DISPATCHED and f.prepared is None]
        fresh = dict(zip(map(id, to_send), await self._encode_intents(to_send, now), strict=True))
        intents = [f.prepared or fresh.get(id(f)) or f.intent(now, self.limits) for f in fires]
        results = await self.ledger.decide(intents, self.owner)
        self._log(fires, [str(r) for r in results], now)

    def _log(self, fires: list[Fire], results: list[str], now: datetime) -> None:
        """One line per fire while fewer than QUIET_BATCH a second are decided; past that, one
        summary line a second (at 2,000 fires a second, a line each costs more than the fire)."""
        self.outcomes.update(result for result in results if result != "decided")
        now_s = time.monotonic()
        if now_s - self._log_window_s >= 1.0:
            self._flush_summary()
            self._log_window_s, self._log_count = now_s, 0
        self._log_count += len(fires)
        if self._log_count <= QUIET_BATCH:
            for fire, result in zip(fires, results, strict=True):
                self._log_one(fire, result, now)
            return
        for fire, result in zip(fires, results, strict=True):
            if result == "decided":
                continue
            self._summary[result] += 1
            if result == Outcome.DISPATCHED:
                self._summary_lags.append((now - fire.scheduled_at).total_seconds() * 1000)

    def _log_one(self, fire: Fire, result: str, now: datetime) -> None:
        log = logger.bind(job_id=fire.job.id, scheduled_at=format_scheduled_at(fire.scheduled_at), task_id=fire.task_id)
        if result == "decided":
            log.debug("fire already decided by another replica")
        elif result == Outcome.DISPATCHED:
            lag_ms = (now - fire.scheduled_at).total_seconds() * 1000
            log.info("fire dispatched lag_ms={:.1f}{}", lag_ms, " (as backup)" if fire.backup else "")
        elif result == Outcome.BUFFERED:
            log.info("fire waiting for a free slot")
        else:
            log.warning("fire {} ({})", result, fire.reason or "overlap: max_instances in flight")

    def _flush_summary(self) -> None:
        summary, self._summary = self._summary, Counter()
        lags, self._summary_lags = sorted(self._summary_lags), []
        if not summary:
            return
        counts = " ".join(f"{outcome}={n}" for outcome, n in sorted(summary.items()))
        p50, top = (lags[len(lags) // 2], lags[-1]) if lags else (0.0, 0.0)
        problems = summary.keys() - {Outcome.DISPATCHED, Outcome.BUFFERED}
        (logger.warning if problems else logger.info)(
            "decided {} fires: {} lag_ms p50={:.1f} max={:.1f}", sum(summary.values()), counts, p50, top
        )

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Decide every fire that is due (jitter and takeover waits cut short), then stop.

        Fires handed over ahead of their time and not yet due are dropped, never published
        early: a follower takes them over, and a restarted scheduler's catch-up hands them over
        again (or records them missed past their grace). Returns False if it could not finish
        within ``timeout_s``."""
        self._closing = True
        now_ts = self.clock().timestamp()
        dropped = 0
        if self._prepare_timer is not None:
            self._prepare_timer.cancel()
            self._prepare_timer = None
        waiting = [fire for fire, _ in self._to_prepare]
        self._to_prepare = []
        for release_ts, handle in self._timers.items():
            handle.cancel()
            waiting += self._timeline[release_ts]
        self._timers, self._timeline = {}, {}
        for fire in waiting:
            if fire.scheduled_at.timestamp() <= now_ts:
                self._enqueue(fire)
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
            logger.error("shutdown: {} fires still undecided after {}s", self._queue.qsize(), timeout_s)
        self._flush_summary()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        return finished
