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
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from loguru import logger

from scheduler.specs import JobDefaults, JobSpec
from scheduler.triggers import LocalCronTrigger, build_trigger, describe_trigger
from shared.errors import ChronoqError
from shared.logging import debug_enabled

# A per-second job down for a day has 86,400 missed fires; past this many they are counted
# in one summary record instead of one record each.
MAX_CATCH_UP_RECORDS = 1000
# Due jobs handled per turn of the event loop: a 10,000-job minute boundary is handed over in
# slices, so dispatching fires that are due meanwhile never waits for the whole burst.
HANDOVER_SLICE = 500
HANDOVER_TICK_S = 0.1
"""With a look-ahead, fires are handed over at most this often (a fire arrives between the
look-ahead and this much less before it is due): at 1,000 fires a second with distinct times,
one wake-up per tick instead of one per fire time."""


def _unsaid(*_: Any) -> None:
    """A log call whose line nobody would see."""


class FireSink(Protocol):
    """Where due fires go (the :class:`~scheduler.dispatch.Dispatcher`, or a recorder in tests)."""

    def submit(self, job: JobSpec, run_times: Sequence[datetime]) -> None: ...

    def record_missed(self, job: JobSpec, times: Sequence[datetime], reason: str) -> None: ...

    def record_skipped(self, job: JobSpec, run_times: Sequence[datetime], reason: str) -> None: ...


class UnknownJobError(ChronoqError, KeyError):
    """No job with that id."""


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


def utc_now() -> datetime:
    return datetime.now(UTC)


def _never_called() -> None:  # pragma: no cover - the executor hands fires to the sink instead
    raise AssertionError("chronoq jobs are dispatched, never run in the scheduler")


class _HeapJobStore(BaseJobStore):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """APScheduler's memory job store, ordered by a heap instead of a sorted list.

    ``MemoryJobStore`` keeps a sorted list, so every fire moves the job with a list delete and
    insert: a memmove of the whole list (tens of µs per fire at 100,000 jobs) and O(n²) to add
    n jobs. Here a job's entry is pushed on a heap with a sequence number; an entry whose number
    is no longer the job's is stale and dropped when it reaches the top.
    """

    def __init__(self) -> None:
        super().__init__()
        self._jobs: dict[str, Job] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, int] = {}  # job id -> sequence number of its heap entry
        self._seq = itertools.count()

    def _push(self, job: Job) -> None:
        if job.next_run_time is None:  # paused in APScheduler: in no order
            self._live.pop(job.id, None)
            return
        seq = next(self._seq)
        self._live[job.id] = seq
        heapq.heappush(self._heap, (job.next_run_time.timestamp(), seq, job.id))
        if len(self._heap) > 2 * len(self._jobs) + 1024:
            self._heap = [entry for entry in self._heap if self._live.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

    def _top(self) -> tuple[float, int, str] | None:
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def pop_due(self, horizon_ts: float, limit: int) -> builtins.list[Job]:
        """Take up to ``limit`` jobs due at or before ``horizon_ts`` out of the order; each must
        be given back with :meth:`update_job` or :meth:`remove_job`."""
        due: builtins.list[Job] = []
        while len(due) < limit and (top := self._top()) is not None and top[0] <= horizon_ts:
            heapq.heappop(self._heap)
            del self._live[top[2]]
            due.append(self._jobs[top[2]])
        return due

    def lookup_job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def get_due_jobs(self, now: datetime) -> builtins.list[Job]:
        return [job for job in self.get_all_jobs() if job.next_run_time is not None and job.next_run_time <= now]

    def get_next_run_time(self) -> datetime | None:
        top = self._top()
        return None if top is None else self._jobs[top[2]].next_run_time

    def get_all_jobs(self) -> builtins.list[Job]:
        def order(job: Job) -> tuple[float, str]:
            return (job.next_run_time.timestamp() if job.next_run_time else float("inf"), job.id)

        return sorted(self._jobs.values(), key=order)

    def add_job(self, job: Job) -> None:
        if job.id in self._jobs:
            raise ConflictingIdError(job.id)
        self._jobs[job.id] = job
        self._push(job)

    def update_job(self, job: Job) -> None:
        if job.id not in self._jobs:
            raise JobLookupError(job.id)
        self._jobs[job.id] = job
        self._push(job)

    def remove_job(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is None:
            raise JobLookupError(job_id)
        self._live.pop(job_id, None)

    def remove_all_jobs(self) -> None:
        self._jobs, self._heap, self._live = {}, [], {}

    def shutdown(self) -> None:
        self.remove_all_jobs()


class _LookaheadScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """An ``AsyncIOScheduler`` that hands each due job's fire times to ``on_due`` ``lookahead_s``
    before they are due, in slices of :data:`HANDOVER_SLICE` jobs per turn of the loop.

    It replaces APScheduler's ``_process_jobs`` (executors, submission events, ``Job._modify``
    validation and one trigger call too many per fire: ~130 µs per job) with the part chronoq
    uses: run times up to the horizon, then the next fire time. No job function ever runs, so
    there is no executor, no instance counting, no coalescing or misfire handling here: the
    sink does those. ``next_run_time`` stays the nominal next fire.
    """

    def __init__(self, on_due: Callable[[str, builtins.list[datetime]], None], lookahead_s: float) -> None:
        self._store = _HeapJobStore()
        super().__init__(
            timezone=UTC,
            jobstores={"default": self._store},
            job_defaults={"coalesce": False, "misfire_grace_time": None, "max_instances": 1},
        )
        self._on_due = on_due
        self.lookahead_s = lookahead_s
        self._since = time.monotonic()

    def _lookahead(self) -> float:
        """The look-ahead grows from 0 to ``lookahead_s`` over the first ``lookahead_s`` seconds:
        taking a full look-ahead of fires at once at start-up is a burst to prepare while the
        first fires are already due; ramping up spreads it over the ramp."""
        return min(self.lookahead_s, time.monotonic() - self._since)

    def add(self, job_id: str, trigger: Any, next_run_time: datetime) -> None:
        """``add_job`` for a chronoq job, without APScheduler's per-job costs (a signature check
        of the function, two rounds of ``Job._modify`` validation, an event): ~100 µs a job,
        10 s at 100,000 jobs. Raises ConflictingIdError for a taken id."""
        job = Job.__new__(Job)
        job._scheduler, job._jobstore_alias = self, "default"
        job.id = job.name = job_id
        job.func, job.func_ref = _never_called, f"{__name__}:_never_called"
        job.trigger, job.executor, job.args, job.kwargs = trigger, "default", (), {}
        job.misfire_grace_time, job.coalesce, job.max_instances = None, False, 1
        job.next_run_time = next_run_time
        with self._jobstores_lock:
            self._store.add_job(job)
        if self.state == STATE_RUNNING:
            self.wakeup()

    def _start_timer(self, wait_seconds: float | None) -> None:
        # APScheduler's timer calls wakeup(), which hops through call_soon_threadsafe (a write
        # to the loop's self-pipe and one more turn of the loop) in case it is called from
        # another thread. The timer is on the loop already.
        self._stop_timer()
        if wait_seconds is not None:
            self._timeout = self._eventloop.call_later(wait_seconds, self._on_timer)

    def _on_timer(self) -> None:
        self._timeout = None
        self._start_timer(self._process_jobs())

    def _process_jobs(self) -> float | None:
        if self.state != STATE_RUNNING:
            return None
        lookahead_s = self._lookahead()
        horizon_ts = time.time() + lookahead_s
        horizon = datetime.fromtimestamp(horizon_ts, UTC)
        store = self._store
        with self._jobstores_lock:
            due = store.pop_due(horizon_ts, HANDOVER_SLICE)
            for job in due:
                run_times: builtins.list[datetime] = []
                fire: datetime | None = job.next_run_time
                try:
                    while fire is not None and fire.timestamp() <= horizon_ts:
                        run_times.append(fire)
                        fire = job.trigger.get_next_fire_time(fire, horizon)
                    self._on_due(job.id, run_times)
                except Exception:
                    logger.bind(job_id=job.id).exception("handing over the job's fires failed")
                if fire is None:
                    store.remove_job(job.id)
                else:
                    job.next_run_time = fire  # what Job._modify would store, without its checks
                    store.update_job(job)
            if len(due) == HANDOVER_SLICE:
                return 0.0  # more may be due: let the loop breathe, then go on
            upcoming = store.get_next_run_time()
        if upcoming is None:
            return None
        wait_s = max(0.0, upcoming.timestamp() - lookahead_s - time.time())
        if lookahead_s < self.lookahead_s:
            # Still ramping up: look again soon, the horizon moves twice as fast as the clock.
            return min(HANDOVER_TICK_S, wait_s)
        # Never later than the fire's time (with a look-ahead under the tick, as in tests).
        return max(wait_s, min(HANDOVER_TICK_S, lookahead_s / 2))


class SchedulerManager:
    """Registers, steers and fires chronoq jobs. Use as ``async with`` or start()/shutdown()."""

    def __init__(
        self,
        defaults: JobDefaults,
        sink: FireSink,
        *,
        last_fires: Callable[[], Awaitable[dict[str, datetime]]] | None = None,
        clock: Callable[[], datetime] = utc_now,
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
        scheduler = _LookaheadScheduler(self._on_due, self.lookahead_s)
        self._scheduler = scheduler
        pending, self._pending = self._pending, {}
        # Added before APScheduler starts, so it wakes up once for all of them, instead of once
        # per job. One line per job at DEBUG: at 100,000 jobs a line each would be most of the
        # start-up. One "now" for all, so jobs with the same cron expression share their first
        # fire's computation (~150 µs each; 100,000 daily jobs have ~1,440 distinct times).
        now = self.clock()
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
        are left alone.
        """
        report = ReloadReport()
        wanted = {spec.id: spec for spec in specs}
        for job_id, current in list(self._specs.items()):
            if current.source != "code" and job_id not in wanted:
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
        now = now or self.clock()
        trigger = build_trigger(spec)
        first = self._first_fire(spec, trigger, now, catch_up=catch_up, first_fires=first_fires)
        if first is None:
            info("job has no fire left ({})", lambda: describe_trigger(spec))
            return
        scheduler = self.scheduler
        assert isinstance(scheduler, _LookaheadScheduler)
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
        grace = spec.misfire_grace_time
        horizon = None if grace is None else now - timedelta(seconds=grace)
        missed: builtins.list[datetime] = []
        fire = trigger.get_next_fire_time(last, now)
        while fire is not None and horizon is not None and fire < horizon and len(missed) < MAX_CATCH_UP_RECORDS:
            missed.append(fire)
            fire = trigger.get_next_fire_time(fire, now)
        reason = "due while no scheduler was running, past its misfire grace"
        if fire is not None and horizon is not None and fire < horizon:
            # Too many to record one by one: resume the grid at the grace horizon.
            logger.bind(job_id=spec.id).warning(
                "more than {} fires missed while down; recording the first {}",
                MAX_CATCH_UP_RECORDS,
                MAX_CATCH_UP_RECORDS,
            )
            fire = trigger.get_next_fire_time(None, horizon)
        if missed:
            self.sink.record_missed(spec, missed, reason)
        return fire  # type: ignore[no-any-return]

    def _on_due(self, job_id: str, run_times: builtins.list[datetime]) -> None:
        spec = self._specs.get(job_id)
        if spec is None:
            return
        self._last_fires[job_id] = run_times[-1]
        if job_id in self._paused:
            self.sink.record_skipped(spec, run_times, "paused")
        else:
            self.sink.submit(spec, run_times)
