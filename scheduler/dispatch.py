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
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import anyio.to_thread
import redis
from loguru import logger

from scheduler.publisher import TaskMessage
from shared.errors import DispatchError
from shared.fleet import FireIntent, FireLedger, Outcome, Overlap
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID, fire_task_id, format_scheduled_at
from shared.redis import raise_if_cancelling

if TYPE_CHECKING:
    from scheduler.specs import JobSpec
    from shared.settings import AppSettings

_RETRYABLE = (redis.RedisError, OSError, DispatchError)
QUIET_BATCH = 20


def utc_now() -> datetime:
    return datetime.now(UTC)


class Encoder(Protocol):
    """Turns task messages into (broker list key, payload); pure CPU, run off the loop."""

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

    @property
    def task_id(self) -> str:
        return fire_task_id(self.job.id, self.scheduled_at)

    def deadline(self) -> datetime | None:
        return deadline_of(self.job, self.scheduled_at)

    def expires_s(self, now: datetime) -> float | None:
        # A message that sits in a backlog past this must not run: the job's own expiry, else
        # its misfire grace, counted from the nominal fire time.
        expires = self.job.expires if self.job.expires is not None else self.job.misfire_grace_time
        return None if expires is None else max(1.0, (self.scheduled_at - now).total_seconds() + expires)

    def message(self, now: datetime, limits: Limits) -> TaskMessage:
        scheduled_at = format_scheduled_at(self.scheduled_at)
        task_id = self.task_id
        return TaskMessage(
            task_name=self.job.task,
            args=list(self.job.args),
            kwargs=dict(self.job.kwargs),
            queue=self.job.queue,
            task_id=task_id,
            headers={HEADER_JOB_ID: self.job.id, HEADER_SCHEDULED_AT: scheduled_at, HEADER_TRACE_ID: task_id},
            priority=self.job.priority,
            expires_s=self.expires_s(now),
            time_limit_s=self.job.time_limit or limits.time_limit_s,
            soft_time_limit_s=self.job.soft_time_limit or limits.soft_time_limit_s,
        )

    def intent(self, now: datetime, limits: Limits, encoded: tuple[str, str] | None = None) -> FireIntent:
        """The fire as the ledger decides it; ``encoded`` is its (list key, payload)."""
        expires = self.expires_s(now)
        wait_s = limits.max_queue_wait_s if expires is None else expires
        lapse_s = wait_s + (self.job.time_limit or limits.time_limit_s) + limits.slot_margin_s
        deadline = self.deadline()
        list_key, payload = encoded or ("", "")
        return FireIntent(
            job_id=self.job.id,
            scheduled_at=format_scheduled_at(self.scheduled_at),
            task_id=self.task_id,
            outcome=self.outcome,
            reason=self.reason,
            trigger=self.trigger,
            max_instances=self.job.max_instances,
            overlap=Overlap.ALLOW if self.force else Overlap(self.job.overlap),
            slot_lapse_ms=int(lapse_s * 1000),
            deadline_ms=0 if deadline is None else int(deadline.timestamp() * 1000),
            list_key=list_key,
            payload=payload,
        )


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
        self.outcomes: Counter[str] = Counter()
        """Outcomes this replica decided (the fleet's are in Redis)."""
        self._queue: asyncio.Queue[Fire] = asyncio.Queue()
        self._delayed: dict[int, tuple[asyncio.TimerHandle, Fire]] = {}
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="chronoq-dispatch")

    # -- intake (on the event loop, never blocking) -------------------------------------------

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None:
        """Take the nominal fire times that came due for ``job``."""
        now = self.clock()
        due: list[datetime] = []
        for at in run_times:
            deadline = deadline_of(job, at)
            if deadline is not None and now > deadline:
                late = f"{(now - at).total_seconds():.1f}s late, grace {job.misfire_grace_time}s"
                self._enqueue(Fire(job, at, Outcome.MISSED, late))
            else:
                due.append(at)
        if job.coalesce and len(due) > 1:
            for at in due[:-1]:
                self._enqueue(Fire(job, at, Outcome.COALESCED, f"coalesced into {format_scheduled_at(due[-1])}"))
            due = due[-1:]
        backup = not self.is_leader()
        for at in due:
            fire = Fire(job, at, backup=backup)
            delay = jitter_of(job, at) + (self.takeover_s if backup else 0.0)
            self._enqueue(fire, delay - max(0.0, (now - at).total_seconds()))

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None:
        """Fires that came due while no scheduler ran and are past their grace."""
        for at in times:
            self._enqueue(Fire(job, at, Outcome.MISSED, reason))

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None:
        """Fires that came due but are not to run (the job is paused)."""
        backup = not self.is_leader()
        for at in run_times:
            self._enqueue(Fire(job, at, Outcome.SKIPPED, reason, backup=backup), self.takeover_s if backup else 0.0)

    def _enqueue(self, fire: Fire, delay_s: float = 0.0) -> None:
        self._idle.clear()
        if delay_s <= 0:
            self._queue.put_nowait(fire)
            return
        handle = asyncio.get_running_loop().call_later(delay_s, self._release, fire)
        self._delayed[id(fire)] = (handle, fire)

    def _release(self, fire: Fire) -> None:
        self._delayed.pop(id(fire), None)
        self._queue.put_nowait(fire)

    # -- deciding ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            raise_if_cancelling()
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._process(batch)
            if self._queue.empty() and not self._delayed:
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

    async def _decide(self, fires: list[Fire]) -> None:
        backups = [f for f in fires if f.backup]
        if backups:
            # A follower's fires: most were decided by the leader already; skip encoding those.
            flags = await self.ledger.decided([(f.job.id, format_scheduled_at(f.scheduled_at)) for f in backups])
            decided = {id(f) for f, flag in zip(backups, flags, strict=True) if int(flag)}
            fires = [f for f in fires if id(f) not in decided]
            if not fires:
                return
        now = self.clock()
        to_send = [f for f in fires if f.outcome is Outcome.DISPATCHED]
        encoded: dict[int, tuple[str, str]] = {}
        if to_send:
            messages = [f.message(now, self.limits) for f in to_send]
            payloads = await anyio.to_thread.run_sync(self.encoder.encode, messages)
            encoded = {id(f): p for f, p in zip(to_send, payloads, strict=True)}
        intents = [f.intent(now, self.limits, encoded.get(id(f))) for f in fires]
        results = await self.ledger.decide(intents, self.owner)
        self._log(fires, [str(r) for r in results], now)

    def _log(self, fires: list[Fire], results: list[str], now: datetime) -> None:
        quiet = len(fires) > QUIET_BATCH
        lags: list[float] = []
        for fire, result in zip(fires, results, strict=True):
            log = logger.bind(
                job_id=fire.job.id, scheduled_at=format_scheduled_at(fire.scheduled_at), task_id=fire.task_id
            )
            if result == "decided":
                log.debug("fire already decided by another replica")
                continue
            self.outcomes[result] += 1
            lag_ms = (now - fire.scheduled_at).total_seconds() * 1000
            if result == Outcome.DISPATCHED:
                lags.append(lag_ms)
                (log.debug if quiet else log.info)(
                    "fire dispatched lag_ms={:.1f}{}", lag_ms, " (as backup)" if fire.backup else ""
                )
            elif result == Outcome.BUFFERED:
                log.info("fire waiting for a free slot")
            else:
                reason = fire.reason or "overlap: max_instances in flight"
                log.warning("fire {} ({})", result, reason)
        if quiet and lags:
            lags.sort()
            logger.info("dispatched {} fires lag_ms p50={:.1f} max={:.1f}", len(lags), lags[len(lags) // 2], lags[-1])

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Decide everything submitted so far (delayed fires at once), then stop. Returns False
        if it could not finish within ``timeout_s``."""
        for handle, fire in list(self._delayed.values()):
            handle.cancel()
            self._release(fire)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            finished = True
        except TimeoutError:
            finished = False
            logger.error("shutdown: {} fires still undecided after {}s", self._queue.qsize(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        return finished
