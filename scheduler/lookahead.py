"""The look-ahead: an APScheduler 3 ``AsyncIOScheduler`` that hands due fires over early.

APScheduler decides *when*; chronoq decides *what happens*. :class:`LookaheadScheduler` replaces
APScheduler's job processing with the part chronoq uses (run times up to a horizon, then the
next fire time) and hands each due job's nominal fire times to a callback ``lookahead_s`` before
they are due. :class:`HeapJobStore` is the memory job store it keeps its jobs in. Both read time
from the injected :class:`~shared.clock.Clock`.
"""

from __future__ import annotations

import builtins
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from loguru import logger

from shared.clock import SYSTEM_CLOCK, Clock

HANDOVER_SLICE = 500
"""Due jobs handled per turn of the event loop: a 10,000-job minute boundary is handed over in
slices, so dispatching fires that are due meanwhile never waits for the whole burst."""
HANDOVER_TICK_S = 0.1
"""With a look-ahead, fires are handed over at most this often (a fire arrives between the
look-ahead and this much less before it is due): at 1,000 fires a second with distinct times,
one wake-up per tick instead of one per fire time."""


def _never_called() -> None:  # pragma: no cover - the executor hands fires to the sink instead
    raise AssertionError("chronoq jobs are dispatched, never run in the scheduler")


class HeapJobStore(BaseJobStore):  # type: ignore[misc]  # APScheduler 3 has no type hints
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

    def next_run_times(self) -> dict[str, datetime | None]:
        """Each job's next nominal fire. Safe from another thread (the metrics server): the
        values are copied in one step, which never sees the dict change half-way."""
        jobs = builtins.list(self._jobs.values())
        return {job.id: job.next_run_time for job in jobs}

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


class LookaheadScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """An ``AsyncIOScheduler`` that hands each due job's fire times to ``on_due`` ``lookahead_s``
    before they are due, in slices of :data:`HANDOVER_SLICE` jobs per turn of the loop.

    It replaces APScheduler's ``_process_jobs`` (executors, submission events, ``Job._modify``
    validation and one trigger call too many per fire: ~130 µs per job) with the part chronoq
    uses: run times up to the horizon, then the next fire time. No job function ever runs, so
    there is no executor, no instance counting, no coalescing or misfire handling here: the
    sink does those. ``next_run_time`` stays the nominal next fire.
    """

    def __init__(
        self,
        on_due: Callable[[str, builtins.list[datetime]], None],
        lookahead_s: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = HeapJobStore()
        self.clock = clock
        super().__init__(
            timezone=UTC,
            jobstores={"default": self._store},
            job_defaults={"coalesce": False, "misfire_grace_time": None, "max_instances": 1},
        )
        self._on_due = on_due
        self.next_run_times = self._store.next_run_times
        self.lookahead_s = lookahead_s
        self._since = clock.monotonic()

    def _lookahead(self) -> float:
        """The look-ahead grows from 0 to ``lookahead_s`` over the first ``lookahead_s`` seconds:
        taking a full look-ahead of fires at once at start-up is a burst to prepare while the
        first fires are already due; ramping up spreads it over the ramp."""
        return min(self.lookahead_s, self.clock.monotonic() - self._since)

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
        horizon_ts = self.clock.time() + lookahead_s
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
        wait_s = max(0.0, upcoming.timestamp() - lookahead_s - self.clock.time())
        if lookahead_s < self.lookahead_s:
            # Still ramping up: look again soon, the horizon moves twice as fast as the clock.
            return min(HANDOVER_TICK_S, wait_s)
        # Never later than the fire's time (with a look-ahead under the tick, as in tests).
        return max(wait_s, min(HANDOVER_TICK_S, lookahead_s / 2))
