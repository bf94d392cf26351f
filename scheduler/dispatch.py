"""From "a trigger fired" to "a message is on the queue": classify, claim, publish, record.

Each nominal fire of a job ends as exactly one :class:`~scheduler.state.Outcome`, logged and
counted:

- **missed**: later than the job's misfire grace when it came due (or when Redis came back);
- **coalesced**: one of several fires due at once for a ``coalesce`` job; only the newest runs;
- **skipped**: the job is paused;
- **dispatched**: claimed in Redis and published to the job's queue.

Jitter delays a fire's publication by 0..jitter s; ``scheduled_at`` stays the nominal time, so
the schedule never drifts. Fires are published in batches (one Redis round trip per batch for
claims, one for the messages, one for the records), off the event loop. When Redis is down a
batch is retried with backoff until each fire's grace runs out; then it is recorded as missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import anyio.to_thread
import redis
from loguru import logger

from scheduler.publisher import TaskMessage
from scheduler.state import ClaimResult, FireRecord, Outcome, StateStore
from shared.errors import DispatchError
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID, fire_task_id, format_scheduled_at

if TYPE_CHECKING:
    from scheduler.specs import JobSpec

_RETRYABLE = (redis.RedisError, OSError, DispatchError)
QUIET_BATCH = 20


def utc_now() -> datetime:
    return datetime.now(UTC)


class Publisher(Protocol):
    """Puts task messages on the broker. Blocking; called from a worker thread."""

    def publish(self, messages: Sequence[TaskMessage]) -> None: ...


def deadline_of(job: JobSpec, scheduled_at: datetime) -> datetime | None:
    """After this a fire is too late to run (None: no limit)."""
    grace = job.misfire_grace_time
    return None if grace is None else scheduled_at + timedelta(seconds=grace)


@dataclass(slots=True)
class Fire:
    """One nominal fire of one job, waiting to be published."""

    job: JobSpec
    scheduled_at: datetime

    @property
    def key(self) -> tuple[str, datetime]:
        return (self.job.id, self.scheduled_at)

    @property
    def task_id(self) -> str:
        return fire_task_id(self.job.id, self.scheduled_at)

    def deadline(self) -> datetime | None:
        return deadline_of(self.job, self.scheduled_at)

    def message(self, now: datetime) -> TaskMessage:
        scheduled_at = format_scheduled_at(self.scheduled_at)
        task_id = self.task_id
        # A message that sits in a backlog past this must not run: the job's own expiry,
        # else its misfire grace, counted from the nominal fire time.
        expires = self.job.expires if self.job.expires is not None else self.job.misfire_grace_time
        expires_s = None if expires is None else max(1.0, (self.scheduled_at - now).total_seconds() + expires)
        return TaskMessage(
            task_name=self.job.task,
            args=list(self.job.args),
            kwargs=dict(self.job.kwargs),
            queue=self.job.queue,
            task_id=task_id,
            headers={HEADER_JOB_ID: self.job.id, HEADER_SCHEDULED_AT: scheduled_at, HEADER_TRACE_ID: task_id},
            priority=self.job.priority,
            expires_s=expires_s,
        )


class Dispatcher:
    """Turns fires into published messages. Create it, ``start()`` it inside a running loop,
    feed it with :meth:`submit`, and ``await drain()`` at shutdown."""

    def __init__(
        self,
        state: StateStore,
        publisher: Publisher,
        *,
        batch_size: int = 500,
        clock: Callable[[], datetime] = utc_now,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.state = state
        self.publisher = publisher
        self.batch_size = batch_size
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self.outcomes: Counter[Outcome] = Counter()
        # None in the queue only wakes the loop to write records that no fire carries.
        self._queue: asyncio.Queue[Fire | None] = asyncio.Queue()
        self._delayed: dict[asyncio.TimerHandle, Fire] = {}
        self._unrecorded: list[FireRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="chronoq-dispatch")

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None:
        """Take the nominal fire times that came due for ``job`` (called on the event loop;
        never blocks)."""
        now = self.clock()
        due: list[datetime] = []
        for at in run_times:
            deadline = deadline_of(job, at)
            if deadline is not None and now > deadline:
                self._note(
                    job.id,
                    at,
                    Outcome.MISSED,
                    f"{(now - at).total_seconds():.1f}s late, grace {job.misfire_grace_time}s",
                )
            else:
                due.append(at)
        if job.coalesce and len(due) > 1:
            for at in due[:-1]:
                self._note(job.id, at, Outcome.COALESCED, f"coalesced into {format_scheduled_at(due[-1])}")
            due = due[-1:]
        loop = asyncio.get_running_loop()
        for at in due:
            fire = Fire(job, at)
            self._idle.clear()
            if job.jitter:
                handle = loop.call_later(random.uniform(0, job.jitter), self._release_delayed, fire)
                self._delayed[handle] = fire
            else:
                self._queue.put_nowait(fire)

    def record_missed(self, job_id: str, times: Sequence[datetime], reason: str) -> None:
        """Record fires that came due while no scheduler was running and are past their grace."""
        self._record_all(job_id, times, Outcome.MISSED, reason)

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None:
        """Record fires that came due but are not to run (the job is paused)."""
        self._record_all(job.id, run_times, Outcome.SKIPPED, reason)

    def _record_all(self, job_id: str, times: Sequence[datetime], outcome: Outcome, reason: str) -> None:
        for at in times:
            self._note(job_id, at, outcome, reason)
        if times:
            self._idle.clear()
            self._queue.put_nowait(None)

    def _release_delayed(self, fire: Fire) -> None:
        for handle, waiting in list(self._delayed.items()):
            if waiting is fire:
                del self._delayed[handle]
        self._queue.put_nowait(fire)

    def _note(
        self,
        job_id: str,
        at: datetime,
        outcome: Outcome,
        reason: str | None = None,
        task_id: str | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        now = self.clock()
        record = FireRecord(job_id, format_scheduled_at(at), outcome, now.isoformat(), task_id, reason)
        self.outcomes[outcome] += 1
        self._unrecorded.append(record)
        log = logger.bind(job_id=job_id, scheduled_at=record.scheduled_at, task_id=task_id)
        if outcome is not Outcome.DISPATCHED:
            log.warning("fire {} ({})", outcome.value, reason)
        elif quiet:
            log.debug("fire dispatched lag_ms={:.1f}", (now - at).total_seconds() * 1000)
        else:
            log.info("fire dispatched lag_ms={:.1f}", (now - at).total_seconds() * 1000)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._process([f for f in batch if f is not None])
            if self._queue.empty() and not self._delayed:
                self._idle.set()

    async def _process(self, fires: list[Fire]) -> None:
        attempt = 0
        published: set[tuple[str, datetime]] = set()
        while True:
            fires = self._drop_expired(fires)
            try:
                if fires:
                    await self._publish_claimed(fires, published)
                    fires = [f for f in fires if f.key not in published]
                await self._flush_records()
                if not fires:
                    return
                # Left over: fires another owner is publishing right now; wait for them.
                await asyncio.sleep(0.1)
            except _RETRYABLE as exc:
                attempt += 1
                delay = min(self.max_backoff_s, 0.05 * 2**attempt)
                logger.warning("dispatch failed (attempt {}), retrying in {:.2f}s: {}", attempt, delay, exc)
                await asyncio.sleep(delay)

    async def _publish_claimed(self, fires: list[Fire], published: set[tuple[str, datetime]]) -> None:
        fresh = [f for f in fires if f.key not in published]
        claims = await self.state.claim([f.key for f in fresh])
        mine = [f for f, claim in zip(fresh, claims, strict=True) if claim is ClaimResult.CLAIMED]
        for fire, claim in zip(fresh, claims, strict=True):
            if claim is ClaimResult.DONE:
                # Published before (by us before a restart, or by another replica): not again.
                published.add(fire.key)
                logger.bind(job_id=fire.job.id, task_id=fire.task_id).debug("fire already dispatched")
        if mine:
            now = self.clock()
            messages = [f.message(now) for f in mine]
            task_ids = [m.task_id for m in messages]
            try:
                await anyio.to_thread.run_sync(self.publisher.publish, messages)
            except BaseException:
                await _best_effort(self.state.release([f.key for f in mine]))
                raise
            # A burst logs one summary line at INFO and each fire at DEBUG: a line per fire would
            # cost more than publishing it.
            quiet = len(mine) > QUIET_BATCH
            for fire, task_id in zip(mine, task_ids, strict=True):
                published.add(fire.key)
                self._note(fire.job.id, fire.scheduled_at, Outcome.DISPATCHED, task_id=task_id, quiet=quiet)
            if quiet:
                lags = sorted((now - f.scheduled_at).total_seconds() * 1000 for f in mine)
                logger.info(
                    "dispatched {} fires lag_ms p50={:.1f} max={:.1f}", len(mine), lags[len(lags) // 2], lags[-1]
                )

    def _drop_expired(self, fires: list[Fire]) -> list[Fire]:
        now = self.clock()
        alive = []
        for fire in fires:
            deadline = fire.deadline()
            if deadline is not None and now > deadline:
                self._note(fire.job.id, fire.scheduled_at, Outcome.MISSED, "could not be published within its grace")
            else:
                alive.append(fire)
        return alive

    async def _flush_records(self) -> None:
        records, self._unrecorded = self._unrecorded, []
        try:
            await self.state.record(records)
        except BaseException:
            self._unrecorded[:0] = records
            raise

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Publish everything submitted so far (delayed fires at once), record every outcome,
        then stop. Returns False if it could not finish within ``timeout_s``."""
        for handle, fire in list(self._delayed.items()):
            handle.cancel()
            self._queue.put_nowait(fire)
        self._delayed.clear()
        if self._unrecorded:
            self._idle.clear()
            self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            finished = True
        except TimeoutError:
            finished = False
            logger.error("shutdown: {} fires still unpublished after {}s", self._queue.qsize(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return finished


async def _best_effort(awaitable: Awaitable[None]) -> None:
    with contextlib.suppress(*_RETRYABLE):
        await awaitable
