"""SchedulerManager: chronoq's jobs on an APScheduler 3 ``AsyncIOScheduler``.

- Jobs registered before :meth:`start` wait in a pending queue and are added, in order, when it
  starts; afterwards they are added at once.
- Defaults (jitter, coalesce, max_instances, misfire grace, time zone) come from
  :class:`~scheduler.specs.JobDefaults`; every job may override them.
- APScheduler decides *when*; chronoq decides *what happens*: a custom executor hands every
  due nominal fire time (including a catch-up's missed ones) to the fire sink, which applies
  misfire grace, coalescing, pausing and jitter itself and records each outcome. So the job
  store is memory only (nothing pickled), APScheduler's own coalesce/misfire/max_instances
  are switched off, and no job function ever runs in this process.
- Restart catch-up: with the last fire of each job loaded from Redis, a job re-registered at
  start resumes its grid from that fire: fires missed past their grace are recorded as missed,
  those within grace are handed over (one if coalescing). A date job that has fired is not
  added again.
- Look-ahead: fires are handed to the sink ``lookahead_s`` *before* they are due (their nominal
  times unchanged), so the sink can prepare them and publish at the due instant instead of
  starting its work then. Whether a job is paused is read at that hand-over.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger

from scheduler.lookahead import LookaheadScheduler
from scheduler.planner import MAX_CATCH_UP_RECORDS, MISSED_WHILE_DOWN, plan_catch_up
from scheduler.specs import JobDefaults, JobSpec
from scheduler.triggers import LocalCronTrigger, build_trigger, describe_trigger
from shared.clock import SYSTEM_CLOCK, Clock
from shared.errors import ChronoqError, UnknownJobError
from shared.logging import debug_enabled

__all__ = ["FireSink", "ReloadReport", "SchedulerManager", "UnknownJobError"]


def _unsaid(*_: Any) -> None:
    """A log call whose line nobody would see."""


class FireSink(Protocol):
    """Where due fires go (the :class:`~scheduler.dispatch.Dispatcher`, or a recorder in tests)."""

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None: ...

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None: ...

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ReloadReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"added={len(self.added)} changed={len(self.changed)} removed={len(self.removed)} "
            f"unchanged={len(self.unchanged)}"
        )


class SchedulerManager:
    """Registers, steers and fires chronoq jobs. Use as ``async with`` or start()/shutdown()."""

    def __init__(
        self,
        defaults: JobDefaults,
        sink: FireSink,
        *,
        last_fires: Callable[[], Awaitable[dict[str, datetime]]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        lookahead_s: float = 0.0,
    ) -> None:
        self.defaults = defaults
        self.sink = sink
        self.clock = clock
        self._load_last_fires = last_fires
        self._last_fires: dict[str, datetime] = {}
        self._specs: dict[str, JobSpec] = {}
        self._pending: dict[str, JobSpec] = {}  # registration order is kept by the dict
        self._paused: dict[str, str] = {}
        self._scheduler: AsyncIOScheduler | None = None
        self.lookahead_s = lookahead_s
        """Fires are handed to the sink this long before they are due."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start APScheduler and add the pending jobs in registration order."""
        if self._scheduler is not None:
            return
        if self._load_last_fires is not None:
            self._last_fires = await self._load_last_fires()
        scheduler = LookaheadScheduler(self._on_due, self.lookahead_s, self.clock)
        self._scheduler = scheduler
        pending, self._pending = self._pending, {}
        # Added before APScheduler starts, so it wakes up once for all of them, instead of once
        # per job. One line per job at DEBUG: at 100,000 jobs a line each would be most of the
        # start-up. One "now" for all, so jobs with the same cron expression share their first
        # fire's computation (~150 µs each; 100,000 daily jobs have ~1,440 distinct times).
        now = self.clock.now()
        first_fires: dict[Any, datetime | None] = {}
        for spec in pending.values():
            self._add(spec, catch_up=True, quiet=True, now=now, first_fires=first_fires)
        scheduler.start()
        logger.info("scheduler started with {} jobs", len(self._specs))

    async def shutdown(self) -> None:
        """Stop firing. Idempotent; fires already handed to the sink are the sink's to finish."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    async def __aenter__(self) -> SchedulerManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def running(self) -> bool:
        return self._scheduler is not None

    @property
    def scheduler(self) -> AsyncIOScheduler:
        """The underlying APScheduler scheduler, for advanced use (after start)."""
        if self._scheduler is None:
            raise ChronoqError("the scheduler is not started")
        return self._scheduler

    # -- registration ------------------------------------------------------------------------

    def register(self, spec: JobSpec) -> JobSpec:
        """Add a job: queued until start, at once after. Raises ChronoqError for a taken id."""
        if spec.id in self._specs or spec.id in self._pending:
            raise ChronoqError(f"job id {spec.id!r} is already registered")
        if self._scheduler is None:
            self._pending[spec.id] = spec
        else:
            self._add(spec, catch_up=True)
        return spec

    def register_cron(self, id: str, task: str, cron: str | dict[str, str | int], **options: Any) -> JobSpec:
        """Register a cron job from code (``options``: any job-file key)."""
        return self.register(self.defaults.make_spec(id=id, task=task, cron=cron, **options))

    def register_interval(self, id: str, task: str, interval: float | dict[str, float], **options: Any) -> JobSpec:
        """Register an interval job from code; ``interval`` in seconds or a mapping."""
        return self.register(self.defaults.make_spec(id=id, task=task, interval=interval, **options))

    def register_date(self, id: str, task: str, date: datetime | str, **options: Any) -> JobSpec:
        """Register a one-off job from code."""
        return self.register(self.defaults.make_spec(id=id, task=task, date=date, **options))

    # -- steering ----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobSpec:
        spec = self._specs.get(job_id) or self._pending.get(job_id)
        if spec is None:
            raise UnknownJobError(job_id)
        return spec

    def list(self) -> builtins.list[JobSpec]:
        """Every registered job (pending ones included), in registration order."""
        return [*self._specs.values(), *self._pending.values()]

    def next_fire_time(self, job_id: str) -> datetime | None:
        """When the job fires next (None: paused in APScheduler, finished, disabled, or not started)."""
        self.get(job_id)
        job = self._scheduler.get_job(job_id) if self._scheduler else None
        return None if job is None else job.next_run_time

    def next_fire_times(self) -> dict[str, datetime | None]:
        """Every started job's next fire; callable from another thread (the metrics server)."""
        scheduler = self._scheduler
        return scheduler.next_run_times() if scheduler is not None else {}

    def has(self, job_id: str) -> bool:
        """Whether a job with this id is registered (pending ones included)."""
        return job_id in self._specs or job_id in self._pending

    def is_paused(self, job_id: str) -> bool:
        return job_id in self._paused

    def job_state(self, spec: JobSpec) -> str:
        """What a fire of ``spec`` handed over earlier should do now that it is due: ``active``
        (dispatch it), ``paused`` (record it skipped) or ``gone`` (the job was removed or
        changed since; drop it, the current job's own fires stand)."""
        current = self._specs.get(spec.id)
        if current is None or (current is not spec and current != spec):
            return "gone"
        return "paused" if spec.id in self._paused else "active"

    def pause(self, job_id: str, note: str = "") -> None:
        """Stop dispatching the job. Its fires keep coming due and are recorded as skipped,
        so a pause is visible in the history and resuming needs no catch-up."""
        self.get(job_id)
        self._paused[job_id] = note

    def resume(self, job_id: str) -> None:
        self.get(job_id)
        self._paused.pop(job_id, None)

    def set_paused(self, paused: Iterable[str]) -> None:
        """Make exactly ``paused`` the paused jobs (used when the flags come from Redis)."""
        self._paused = {job_id: self._paused.get(job_id, "") for job_id in paused}

    def remove(self, job_id: str) -> JobSpec:
        spec = self.get(job_id)
        self._pending.pop(job_id, None)
        self._specs.pop(job_id, None)
        self._paused.pop(job_id, None)
        if self._scheduler is not None:
            # Disabled or finished jobs are not in APScheduler.
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(job_id)
        logger.bind(job_id=job_id).info("job removed")
        return spec

    def replace(self, spec: JobSpec) -> JobSpec:
        """Put ``spec`` in place of the registered job of its id (a changed trigger starts its
        new grid at its first fire after now, with no catch-up; the same trigger keeps its grid)."""
        return self._replace(self.get(spec.id), spec)

    def forget_last_fire(self, job_id: str) -> None:
        """Drop the job's last recorded fire: a job registered later under this id is new and
        catches nothing up (a deleted then re-created API job)."""
        self._last_fires.pop(job_id, None)

    def modify(self, job_id: str, **changes: Any) -> JobSpec:
        """Change any job-file field(s) of a job, validated like a job file; the job's next fire
        is recomputed only when its schedule changed."""
        old = self.get(job_id)
        data = {**old.model_dump(by_alias=True), **changes}
        if {"cron", "interval", "date"} & changes.keys():
            for key in ("cron", "interval", "date"):
                if key not in changes:
                    data.pop(key, None)
        return self._replace(old, self.defaults.make_spec(**data))

    def reschedule(self, job_id: str, *, cron: Any = None, interval: Any = None, date: Any = None) -> JobSpec:
        """Give a job a new trigger (exactly one of cron, interval, date)."""
        changes = {k: v for k, v in {"cron": cron, "interval": interval, "date": date}.items() if v is not None}
        return self.modify(job_id, **changes)

    def reconcile(self, specs: Sequence[JobSpec]) -> ReloadReport:
        """Make the registered jobs of the same sources equal ``specs`` (a reload).

        Jobs whose spec is unchanged keep their schedule exactly; changed ones are replaced;
        jobs from a file that are no longer in ``specs`` are removed. Jobs registered from code
        or created through the API are left alone.
        """
        report = ReloadReport()
        wanted = {spec.id: spec for spec in specs}
        for job_id, current in list(self._specs.items()):
            if current.source not in ("code", "api") and job_id not in wanted:
                self.remove(job_id)
                report.removed.append(job_id)
        for spec in specs:
            existing = self._specs.get(spec.id)
            if existing is None:
                self.register(spec)
                report.added.append(spec.id)
            elif existing == spec:
                self._specs[spec.id] = spec  # same schedule; keep the newest source name
                report.unchanged.append(spec.id)
            else:
                self._replace(existing, spec)
                report.changed.append(spec.id)
        return report

    # -- internals ---------------------------------------------------------------------------

    def _replace(self, old: JobSpec, new: JobSpec) -> JobSpec:
        if self._scheduler is None or old.id not in self._specs:
            self._pending[old.id] = new
            return new
        paused = self._paused.get(old.id)
        self.remove(old.id)
        self._add(new, catch_up=False)
        if paused is not None:
            self._paused[new.id] = paused
        logger.bind(job_id=new.id).info("job changed: {}", describe_trigger(new))
        return new

    def _add(
        self,
        spec: JobSpec,
        *,
        catch_up: bool,
        quiet: bool = False,
        now: datetime | None = None,
        first_fires: dict[Any, datetime | None] | None = None,
    ) -> None:
        self._specs[spec.id] = spec
        # Quiet (start-up): a DEBUG line per job, and nothing at all built when DEBUG is off.
        info: Callable[..., None] = _unsaid
        if not quiet or debug_enabled():
            say = logger.bind(job_id=spec.id).opt(lazy=True)
            info = say.debug if quiet else say.info
        if not spec.enabled:
            info("job registered disabled")
            return
        now = now or self.clock.now()
        trigger = build_trigger(spec)
        first = self._first_fire(spec, trigger, now, catch_up=catch_up, first_fires=first_fires)
        if first is None:
            info("job has no fire left ({})", lambda: describe_trigger(spec))
            return
        scheduler = self.scheduler
        assert isinstance(scheduler, LookaheadScheduler)
        scheduler.add(spec.id, trigger, first)
        info("job added: {} next={}", lambda: describe_trigger(spec), first.isoformat)

    def _first_fire(
        self,
        spec: JobSpec,
        trigger: Any,
        now: datetime,
        *,
        catch_up: bool,
        first_fires: dict[Any, datetime | None] | None = None,
    ) -> datetime | None:
        """The first fire to hand APScheduler, after recording what was missed while down.
        ``first_fires`` caches a cron trigger's first fire after ``now`` by its expression."""
        last = self._last_fires.get(spec.id)
        if spec.kind == "date":
            # A date job fires once, ever: not again after a restart or a reload.
            assert spec.date is not None
            return None if last is not None and last >= spec.date else trigger.get_next_fire_time(None, now)
        if last is None or not catch_up:
            if first_fires is None or not isinstance(trigger, LocalCronTrigger):
                return trigger.get_next_fire_time(None, now)  # type: ignore[no-any-return]
            # parse_cron is cached, so jobs with one expression share one CronExpr object.
            key = (id(trigger.expr), trigger.timezone.key, trigger.start_date, trigger.end_date)
            if key not in first_fires:
                first_fires[key] = trigger.get_next_fire_time(None, now)
            return first_fires[key]
        plan = plan_catch_up(spec, last, now, trigger.get_next_fire_time)
        if plan.truncated:
            logger.bind(job_id=spec.id).warning(
                "more than {} fires missed while down; recording the first {}",
                MAX_CATCH_UP_RECORDS,
                MAX_CATCH_UP_RECORDS,
            )
        if plan.missed:
            self.sink.record_missed(spec, plan.missed, MISSED_WHILE_DOWN)
        return plan.first

    def _on_due(self, job_id: str, run_times: builtins.list[datetime]) -> None:
        spec = self._specs.get(job_id)
        if spec is None:
            return
        self._last_fires[job_id] = run_times[-1]
        if job_id in self._paused:
            self.sink.record_skipped(spec, run_times, "paused")
        else:
            self.sink.submit(spec, run_times)
