"""One nominal fire of one job, and what it becomes on the wire: a task message and the intent
the ledger decides (:class:`shared.fleet.FireIntent`). Pure data; the rules that give a fire its
outcome and release time are in :mod:`scheduler.planner`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from scheduler.message import TaskMessage
from shared.fleet import FireIntent, Outcome, Overlap
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID, fire_task_id_of, format_scheduled_at

if TYPE_CHECKING:
    from scheduler.specs import JobSpec
    from shared.settings import AppSettings

SCHEDULE = "schedule"
MANUAL = "manual"
BACKFILL = "backfill"


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


@dataclass(slots=True)
class Fire:
    """One nominal fire of one job, waiting to be decided."""

    job: JobSpec
    scheduled_at: datetime
    outcome: Outcome = Outcome.DISPATCHED
    reason: str = ""
    trigger: str = SCHEDULE
    backup: bool = False
    """Handled as a follower: the leader has probably decided it already."""
    force: bool = False
    """A manual trigger that ignores the overlap policy."""
    release_ts: float = 0.0
    """Epoch seconds at which it is decided, never before (set by the planner)."""
    prepared: FireIntent | None = None
    catch_up: bool = False
    """Dispatched for a backlog: others were coalesced into it, or it waited for Redis to come
    back (the planner's "overdue at the last catch-up" rule then covers its late siblings)."""
    """The fire encoded ahead of its time, ready to decide (only while it is to be dispatched)."""
    _stamp: str = field(default="", repr=False)
    _task_id: str = field(default="", repr=False)

    def becomes(self, outcome: Outcome, reason: str) -> None:
        """Give the fire another outcome (a re-plan); an encoded message no longer applies."""
        self.outcome, self.reason, self.prepared = outcome, reason, None

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
        message_expires = job.expires if job.expires is not None else job.misfire_grace_time
        expiry_ms = 0 if message_expires is None else int((self.scheduled_at.timestamp() + message_expires) * 1000)
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
            expiry_ms=expiry_ms,
        )


_OVERLAPS = {overlap.value: overlap for overlap in Overlap}
