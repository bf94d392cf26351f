"""The long-running scheduler service: lifecycle, signals, reload, the local worker.

``serve()`` validates the job files before touching Redis (a bad file: exit 78, nothing
written), resolves Redis (embedded when ``REDIS_URL`` is unset), and runs
:class:`SchedulerService` until SIGTERM/SIGINT. SIGHUP, or a change of a job file with
``--watch``, reloads the files; an invalid file is rejected and the running set stays.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from scheduler.dispatch import Dispatcher
from scheduler.manager import SchedulerManager
from scheduler.publisher import BatchPublisher
from scheduler.specs import JobDefaults, JobSpec, load_job_specs
from scheduler.state import StateStore
from shared.celery_app import create_celery_app
from shared.errors import EX_CONFIG, ConfigError, RedisUnavailableError
from shared.names import RedisKeys
from shared.redis import create_async_redis, create_redis, resolve_redis
from shared.schedules import declared_schedules
from shared.settings import AppSettings

DEFAULT_JOB_FILES = (Path("configs/jobs.yaml"),)
SHUTDOWN_BUDGET_S = 10.0


@dataclass
class ServiceOptions:
    job_files: list[Path] = field(default_factory=lambda: list(DEFAULT_JOB_FILES))
    watch: bool = False
    local_worker: bool | None = None
    """Start one local worker for both queues; None: only when Redis is embedded."""
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
    if problems:
        raise ConfigError(problems)
    return specs


class SchedulerService:
    """Redis state, the dispatcher and the manager, started and stopped together."""

    def __init__(self, settings: AppSettings, options: ServiceOptions, specs: list[JobSpec]) -> None:
        self.settings = settings
        self.options = options
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._initial_specs = specs
        self._stack = AsyncExitStack()
        self.manager: SchedulerManager
        self.dispatcher: Dispatcher
        self.state: StateStore

    async def __aenter__(self) -> SchedulerService:
        settings = self.settings
        try:
            client = create_async_redis(settings.redis)
            self._stack.push_async_callback(client.aclose)
            await _wait_for_redis(client, settings)
            app = create_celery_app(settings, name="chronoq-scheduler")
            self._stack.callback(app.close)
            publisher = BatchPublisher(
                app,
                lambda: create_redis(settings.redis, settings.broker_url()),
                batch_size=settings.scheduler.publish_batch_size,
            )
            self._stack.callback(publisher.close)
            self.state = StateStore(
                client, RedisKeys(settings.redis.key_prefix), self.owner, history_limit=settings.scheduler.history_limit
            )
            self.dispatcher = Dispatcher(self.state, publisher, batch_size=settings.scheduler.publish_batch_size)
            self.dispatcher.start()
            self._stack.push_async_callback(self._drain)
            defaults = JobDefaults.from_settings(settings.scheduler, settings.celery.cron_queue)
            self.manager = SchedulerManager(defaults, self.dispatcher, last_fires=self.state.load_last_fires)
            for spec in self._initial_specs:
                self.manager.register(spec)
            await self.manager.start()
            self._stack.push_async_callback(self.manager.shutdown)
        except BaseException:
            await self._stack.aclose()
            raise
        logger.info("scheduler {} running {} jobs", self.owner, len(self.manager.list()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _drain(self) -> None:
        if not await self.dispatcher.drain(timeout_s=SHUTDOWN_BUDGET_S / 2):
            logger.error("shutdown: not every fire could be published or recorded")
        logger.info("scheduler stopped; outcomes {}", dict(self.dispatcher.outcomes))

    def reload(self) -> bool:
        """Re-read the job files and apply the difference; on invalid files change nothing."""
        try:
            specs = load_specs(self.settings, self.options)
        except ConfigError as exc:
            for line in exc.problems:
                logger.error("reload rejected: {}", line)
            return False
        report = self.manager.reconcile(specs)
        logger.info("reloaded job files: {}", report)
        return True


async def _wait_for_redis(client: object, settings: AppSettings) -> None:
    """Retry until Redis answers, reporting each failure; never give up on our own."""
    import redis

    delay = 0.5
    while True:
        try:
            await client.ping()  # type: ignore[attr-defined]
            return
        except redis.AuthenticationError as exc:
            raise RedisUnavailableError(f"redis rejected our credentials: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            logger.warning("redis unavailable ({}); retrying in {:.1f}s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _file_stamps(paths: list[Path]) -> list[tuple[float, int] | None]:
    stamps: list[tuple[float, int] | None] = []
    for path in paths:
        try:
            stat = path.stat()
            stamps.append((stat.st_mtime, stat.st_size))
        except OSError:
            stamps.append(None)
    return stamps


async def _watch(service: SchedulerService) -> None:
    paths = service.options.job_files
    seen = _file_stamps(paths)
    while True:
        await asyncio.sleep(service.options.watch_interval_s)
        now = _file_stamps(paths)
        if now != seen:
            seen = now
            logger.info("job files changed; reloading")
            service.reload()


async def run_service(
    settings: AppSettings,
    options: ServiceOptions,
    specs: list[JobSpec],
    on_stop: list[subprocess.Popen[bytes]] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with SchedulerService(settings, options, specs) as service:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, service.reload)
        watcher = loop.create_task(_watch(service)) if options.watch else None
        try:
            await stop.wait()
            logger.info("shutting down")
            for process in on_stop or []:
                process.send_signal(signal.SIGTERM)  # the local worker's warm shutdown runs alongside ours
        finally:
            if watcher is not None:
                watcher.cancel()
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
    local_worker = options.local_worker if options.local_worker is not None else settings.redis.url is None
    with resolve_redis(settings) as settings:
        workers = [_start_local_worker(settings)] if local_worker else []
        try:
            return asyncio.run(run_service(settings, options, specs, on_stop=workers))
        except RedisUnavailableError as exc:
            logger.error("{}", exc)
            return EX_CONFIG
        finally:
            for worker in workers:
                _stop_local_worker(worker)


def _start_local_worker(settings: AppSettings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": settings.redis.connection_url()}
    process = subprocess.Popen(
        [sys.executable, "-m", "run_worker", "--hostname", f"local@{os.uname().nodename}"],
        env=env,
        start_new_session=True,
    )
    logger.info("started a local worker pid={} for both queues (--no-worker to skip)", process.pid)
    return process


def _stop_local_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(SHUTDOWN_BUDGET_S / 2)
    except subprocess.TimeoutExpired:
        logger.warning("local worker did not stop in time; killing it")
        process.kill()
        process.wait(5)
