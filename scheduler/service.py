"""The long-running scheduler service: lifecycle, signals, reload, the local worker.

``serve()`` validates the job files before touching Redis (a bad file: exit 78, nothing
written), resolves Redis (embedded when ``REDIS_URL`` is unset), and runs
:class:`SchedulerService` until SIGTERM/SIGINT. SIGHUP, or a change of a job file with
``--watch``, reloads the files; an invalid file is rejected and the running set stays.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis
from loguru import logger

from scheduler.audit import DispatchAudit
from scheduler.control import ControlStore, file_hashes, source_hash
from scheduler.dispatch import Dispatcher, Limits
from scheduler.encoder import MessageEncoder
from scheduler.epoch import DataEpoch
from scheduler.events import SentEvents
from scheduler.jobfeed import JobFeed
from scheduler.leadership import Leadership, lease_ms_for
from scheduler.localworker import SHUTDOWN_BUDGET_S, LocalWorker, watch_job_files
from scheduler.manager import SchedulerManager
from scheduler.observability import Observability
from scheduler.preflight import wait_for_redis
from scheduler.specs import JobDefaults, JobSpec, load_job_specs, time_limit_problems
from scheduler.state import StateStore
from shared.celery_app import create_celery_app
from shared.cli_support import exit_code
from shared.clock import SYSTEM_CLOCK, Clock
from shared.errors import EX_CONFIG, ChronoqError, ConfigError
from shared.fleet import FireLedger, scheduler_ledger
from shared.names import RedisKeys
from shared.redis import create_async_redis, raise_if_cancelling, resolve_redis
from shared.schedules import declared_schedules
from shared.settings import AppSettings

DEFAULT_JOB_FILES = (Path("configs/jobs.yaml"),)
RELEASE_TIMEOUT_S = 1.0
CONTROL_POLL_S = 0.5


@dataclass
class ServiceOptions:
    job_files: list[Path] = field(default_factory=lambda: list(DEFAULT_JOB_FILES))
    watch: bool = False
    local_worker: bool | None = None
    """Start one local worker for both queues; None: only when Redis is embedded (neither
    ``REDIS_URL`` nor ``REDIS_SENTINELS`` set)."""
    watch_interval_s: float = 1.0


def load_specs(settings: AppSettings, options: ServiceOptions) -> list[JobSpec]:
    """Job files plus schedules declared in ``TASK_MODULES``. Raises ConfigError."""
    specs = load_job_specs(options.job_files, settings.scheduler, settings.celery.cron_queue)
    defaults = JobDefaults.from_settings(settings.scheduler, settings.celery.cron_queue)
    taken = {spec.id for spec in specs}
    problems = []
    for declared in declared_schedules(settings.task_modules):
        try:
            spec = defaults.make_spec(**declared)
        except ConfigError as exc:
            problems += [f"TASK_MODULES schedule {line}" for line in exc.problems]
            continue
        if spec.id in taken:
            problems.append(f"TASK_MODULES schedule {spec.id}: id is already used by a job file")
        taken.add(spec.id)
        specs.append(spec)
    problems += time_limit_problems(specs, settings)
    if problems:
        raise ConfigError(problems)
    return specs


class SchedulerService:
    """One replica: Redis state, leadership, the dispatcher and the manager, started and stopped
    together. Any number of them may run against one Redis."""

    def __init__(
        self,
        settings: AppSettings,
        options: ServiceOptions,
        specs: list[JobSpec],
        clock: Clock = SYSTEM_CLOCK,
        observability: Observability | None = None,
    ) -> None:
        self.settings = settings
        self.observability = observability
        self.clock = clock  # the one clock of the replica: manager, look-ahead, dispatcher, leadership
        self.options = options
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._initial_specs = specs
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self.manager: SchedulerManager
        self.dispatcher: Dispatcher
        self.state: StateStore
        self.ledger: FireLedger
        self.control: ControlStore
        self.leadership: Leadership
        self._registry: asyncio.Task[None]
        self.epoch: DataEpoch
        self.feed: JobFeed
        self.audit: DispatchAudit

    async def __aenter__(self) -> SchedulerService:
        settings = self.settings
        try:
            await wait_for_redis(settings)
            client = create_async_redis(settings.redis)
            self._stack.push_async_callback(client.aclose)
            app = create_celery_app(settings, name="chronoq-scheduler")
            self._stack.callback(app.close)
            encoder = MessageEncoder(app)
            keys = RedisKeys(settings.redis.key_prefix)
            sched = settings.scheduler
            self.ledger = scheduler_ledger(client, settings)
            self.state = StateStore(client, keys)
            self.control = ControlStore(client, keys)
            self.leadership = Leadership(
                client, keys, self.owner, lease_ms=lease_ms_for(sched.takeover_s), clock=self.clock
            )
            self.epoch = DataEpoch(client, keys, self._after_data_loss)
            await self.epoch.claim()
            await self.leadership.tick()
            self._stack.push_async_callback(self._release_lease)
            self.dispatcher = Dispatcher(
                self.ledger,
                encoder,
                self.owner,
                Limits.from_settings(settings),
                batch_size=sched.publish_batch_size,
                takeover_s=sched.takeover_s,
                is_leader=self.leadership.is_leader,
                clock=self.clock,
                metrics=observability.metrics if (observability := self.observability) else None,
                events=SentEvents.for_app(app, client),
            )
            self.leadership.metrics = self.dispatcher.metrics
            self.dispatcher.start()
            self._stack.push_async_callback(self._drain)
            defaults = JobDefaults.from_settings(sched, settings.celery.cron_queue)
            self.manager = SchedulerManager(
                defaults,
                self.dispatcher,
                last_fires=self.state.load_last_fires,
                clock=self.clock,
                lookahead_s=sched.lookahead_s,
            )
            self.dispatcher.job_state = self.manager.job_state
            self.audit = DispatchAudit(
                self.ledger, client, encoder, Limits.from_settings(settings), settings, self._job_spec,
                is_leader=self.leadership.is_leader, clock=self.clock,
            )  # fmt: skip
            self.leadership.on_promoted = self.dispatcher.promote
            self._hashes = file_hashes(self.options.job_files)
            self.feed = JobFeed(
                client, keys, self.manager, self.owner, settings, ledger=self.ledger,
                encode=encoder.encode, is_leader=self.leadership.is_leader, on_change=self._count_jobs,
                events=self.dispatcher.events,
            )  # fmt: skip
            for spec in [*await self.feed.load(), *await self._without_removed(self.feed.admit(self._initial_specs))]:
                self.manager.register(spec)
            self.manager.set_paused(await self.control.paused())
            await self.manager.start()
            self._stack.push_async_callback(self.manager.shutdown)
            self._count_jobs()
            _freeze_heap()
            self.leadership.outcomes = self.dispatcher.outcomes
            if observability is not None:
                observability.attach(
                    settings,
                    owner=self.owner,
                    role=lambda: "leader" if self.leadership.is_leader() else "follower",
                    jobs=self.manager.list,
                    next_fires=self.manager.next_fire_times,
                    queue_keys=encoder.queue_keys,
                    queues=sorted({settings.celery.cron_queue, settings.celery.default_queue}),
                )
            loops = (self.leadership.run, self._follow_control, self._sweep_buffers, self.epoch.watch, self.feed.follow)
            for loop_fn in (*loops, self.feed.sweep_backfills, self.audit.run):
                self._tasks.append(asyncio.get_running_loop().create_task(loop_fn()))
            # The registry is for operators; at 100,000 jobs writing it takes seconds, which
            # the first fires should not wait for.
            self._registry = asyncio.get_running_loop().create_task(self._publish_registry())
            self._tasks.append(self._registry)
            self._stack.push_async_callback(self._stop_tasks)
        except BaseException:
            await self._stack.aclose()
            raise
        role = "leader" if self.leadership.is_leader() else "follower"
        logger.info("scheduler {} running {} jobs as {}", self.owner, len(self.manager.list()), role)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=2.0)
        for task in stuck:
            logger.error("background task {} did not stop when cancelled", task.get_name())

    async def _release_lease(self) -> None:
        # Bounded: during a Redis stall an unbounded release waits out the socket timeout and
        # shutdown overruns its budget. An unreleased lease lapses by itself in takeover_s.
        try:
            await asyncio.wait_for(self.leadership.release(), RELEASE_TIMEOUT_S)
        except TimeoutError:
            logger.warning(
                "shutdown: leader lease not released within {}s (redis stalled); it lapses", RELEASE_TIMEOUT_S
            )

    async def _after_data_loss(self) -> None:
        """Redis lost its data: put back what this replica owns (scheduler.epoch)."""
        await asyncio.wait([self._registry])
        await self.control.publish_jobs(self.manager.list(), self._hashes)
        await self.feed.resync()  # the API jobs are gone with the data: stop running them
        await self.leadership.tick()

    def _job_spec(self, job_id: str) -> JobSpec | None:
        return self.manager.get(job_id) if self.manager.has(job_id) else None

    def _count_jobs(self) -> None:
        self.leadership.jobs = len(self.manager.list())

    async def _drain(self) -> None:
        if not await self.dispatcher.drain(timeout_s=SHUTDOWN_BUDGET_S / 2):
            logger.error("shutdown: not every fire could be decided")
        logger.info("scheduler stopped; outcomes {}", dict(self.dispatcher.outcomes))

    async def _without_removed(self, specs: list[JobSpec]) -> list[JobSpec]:
        """Drop jobs removed at runtime whose definition has not changed since; forget the
        removal of those whose definition changed (they come back)."""
        removed = await self.control.removed()
        kept = []
        for spec in specs:
            entry = removed.get(spec.id)
            if entry is None:
                kept.append(spec)
            elif entry.get("source_hash") == source_hash(spec, self._hashes):
                logger.bind(job_id=spec.id).info("job stays removed (its definition has not changed since)")
            else:
                await self.control.restore(spec.id, note="its definition changed", by=self.owner)
                logger.bind(job_id=spec.id).info("removed job comes back: its definition changed")
                kept.append(spec)
        return kept

    async def reload(self) -> bool:
        """Re-read the job files and apply the difference; on invalid files change nothing."""
        try:
            specs = load_specs(self.settings, self.options)
        except ConfigError as exc:
            for line in exc.problems:
                logger.error("reload rejected: {}", line)
            if self.dispatcher.metrics is not None:
                self.dispatcher.metrics.reload(False, len(exc.problems))
            return False
        before = {spec.id for spec in self.manager.list()}
        self._hashes = file_hashes(self.options.job_files)
        # Admitted last, with no await after it: an API job the feed applied meanwhile wins.
        report = self.manager.reconcile(self.feed.admit(await self._without_removed(specs)))
        await asyncio.wait([self._registry])  # the start-up's registry must not land after this one
        await self.control.publish_jobs(
            self.manager.list(), self._hashes, dropped=before - {s.id for s in self.manager.list()}
        )
        self._count_jobs()
        logger.info("reloaded job files: {}", report)
        if self.dispatcher.metrics is not None:
            self.dispatcher.metrics.reload(True)
        _freeze_heap()
        return True

    async def _publish_registry(self) -> None:
        """Write the job registry (what ``chronoq jobs list`` shows); retried until Redis takes it."""
        delay = 0.5
        while True:
            raise_if_cancelling()
            try:
                await self.control.publish_jobs(self.manager.list(), self._hashes)
                return
            except (redis.RedisError, OSError) as exc:
                raise_if_cancelling()
                logger.warning("writing the job registry failed: {}; retrying in {:.1f}s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _follow_control(self) -> None:
        """Apply operators' changes (pause, resume, remove) within CONTROL_POLL_S.

        Polled rather than subscribed: two small reads a tick, and unlike a redis-py pub/sub
        read it always stops when cancelled (a cancelled ``get_message`` can hang shutdown).
        """
        while True:
            raise_if_cancelling()
            try:
                self.manager.set_paused(await self.control.paused())
                for job_id in await self.control.removed():
                    if self.manager.has(job_id):
                        self.manager.remove(job_id)
                        self._count_jobs()
            except (redis.RedisError, OSError) as exc:
                raise_if_cancelling()
                logger.warning("reading operator changes failed: {}; retrying", exc)
            await asyncio.sleep(CONTROL_POLL_S)

    async def _sweep_buffers(self) -> None:
        """Dispatch waiting buffer_one fires whose slot lapsed (a worker died holding it)."""
        while True:
            raise_if_cancelling()
            await asyncio.sleep(1.0)
            if not self.leadership.is_leader():
                continue
            try:
                waiting = await self.control.client.smembers(self.control.keys.buffered)
                if waiting:
                    await self.ledger.release(sorted(str(job_id) for job_id in waiting))
            except (redis.RedisError, OSError) as exc:
                raise_if_cancelling()
                logger.warning("buffer sweep: {}", exc)


def _freeze_heap() -> None:
    """Move what exists now (the jobs, their specs and triggers) out of the garbage collector's
    view. They live as long as the process; without this every full collection walks them all,
    a pause of hundreds of milliseconds with 100,000 jobs, and fires due during it go out late."""
    gc.collect()
    gc.freeze()


async def run_service(
    settings: AppSettings,
    options: ServiceOptions,
    specs: list[JobSpec],
    on_stop: list[LocalWorker] | None = None,
    observability: Observability | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads. Returns the exit code.

    A SIGTERM or SIGINT while the service starts (it waits for Redis, or for a Sentinel to name
    a master, as long as it takes) cancels the start: 0, and the caller stops what it started
    (SIGTERM's default action ended the process there and left the local worker behind)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def stop_starting() -> None:
        stop.set()
        main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_starting)
    heartbeat = loop.create_task(observability.heartbeat()) if observability is not None else None
    if observability is not None:
        observability.install_test_hook(loop)
    watcher = None
    try:
        async with SchedulerService(settings, options, specs, observability=observability) as service:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(service.reload()))
            if options.watch:
                watcher = loop.create_task(watch_job_files(options.job_files, options.watch_interval_s, service.reload))
            await stop.wait()
            logger.info("shutting down")
            if observability is not None:
                observability.stopping()
            for worker in on_stop or []:
                worker.terminate()  # the local worker's warm shutdown runs alongside ours
    except asyncio.CancelledError:
        if not stop.is_set() or main.uncancel():
            raise
        logger.info("stopped while starting")
    finally:
        for task in (watcher, heartbeat):
            if task is not None:
                task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


def serve(settings: AppSettings, options: ServiceOptions) -> int:
    """The scheduler's entry: validate, resolve Redis, run; returns the process exit code."""
    try:
        specs = load_specs(settings, options)
    except ConfigError as exc:
        for line in exc.problems:
            logger.error("{}", line)
        logger.error("not started: fix the job files above (nothing was written to Redis)")
        return EX_CONFIG
    embedded = settings.redis.url is None and not settings.redis.uses_sentinel
    local_worker = options.local_worker if options.local_worker is not None else embedded
    observability = Observability(settings)  # its server binds HTTP_PORT first: a port in use is 78, nothing started
    with resolve_redis(settings) as settings:
        workers = [LocalWorker(settings).start()] if local_worker else []
        try:
            return asyncio.run(run_service(settings, options, specs, on_stop=workers, observability=observability))
        except ChronoqError as exc:  # a wrong password, TLS, eviction, the broker elsewhere
            for line in str(exc).splitlines():
                logger.error("not started: {}", line)
            return exit_code(exc)
        finally:
            observability.stop()
            for worker in workers:
                worker.stop()
