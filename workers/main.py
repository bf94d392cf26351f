"""The worker entry: build the app, check Redis, run a Celery worker on the chosen queues."""

from __future__ import annotations

import socket

from celery import Celery
from loguru import logger

from shared.celery_app import create_celery_app
from shared.cli_support import exit_code
from shared.errors import ChronoqError
from shared.redaction import redact_url
from shared.redis import preflight, resolve_redis
from shared.settings import AppSettings
from workers.hooks import install_worker_hooks

DEMO_TASK_MODULES = ("workers.tasks.demo",)
TASK_BASE = "workers.runtime:ChronoqTask"


def create_worker_app(settings: AppSettings) -> Celery:
    """The worker's Celery app: chronoq's config, the demo tasks plus ``TASK_MODULES``, and the
    task base class that runs ``async def`` bodies. Becomes the current app, so modules that
    declare tasks with ``@shared_task`` register on it."""
    modules = list(dict.fromkeys([*DEMO_TASK_MODULES, *settings.task_modules]))
    return create_celery_app(settings, task_modules=modules, task_cls=TASK_BASE, set_as_current=True)


def worker_argv(settings: AppSettings) -> list[str]:
    """The ``celery worker`` arguments for ``settings.worker``."""
    options = settings.worker
    queues = options.queues or [settings.celery.cron_queue, settings.celery.default_queue]
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        options.pool,
        "--loglevel",
        settings.log.level if settings.log.level not in ("TRACE", "SUCCESS") else "INFO",
        "--hostname",
        options.hostname or f"chronoq@{socket.gethostname()}",
    ]
    if options.concurrency is not None:
        argv += ["--concurrency", str(options.concurrency)]
    if options.max_tasks_per_child is not None:
        argv += ["--max-tasks-per-child", str(options.max_tasks_per_child)]
    if options.max_memory_per_child_kb is not None:
        argv += ["--max-memory-per-child", str(options.max_memory_per_child_kb)]
    return argv


def main(settings: AppSettings) -> int:
    """Run one worker until it is told to stop (SIGTERM: warm shutdown). Returns the exit code.

    Redis is checked first (:func:`shared.redis.preflight`): wrong credentials, a TLS mistake or
    an evicting ``maxmemory-policy`` end the process at once with a clear message (78) instead
    of Celery retrying forever; an unreachable Redis gives 69.
    """
    with resolve_redis(settings) as settings:
        try:
            preflight(settings)
        except ChronoqError as exc:  # credentials, TLS, eviction: 78; unreachable: 69
            logger.error("worker not started: {}", exc)
            return exit_code(exc)
        install_worker_hooks(settings)
        app = create_worker_app(settings)
        argv = worker_argv(settings)
        logger.info("starting worker {} broker={}", " ".join(argv[1:]), redact_url(settings.broker_url()))
        try:
            app.worker_main(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 0
        return 0
