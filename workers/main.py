"""The worker entry: check Redis, then supervise a Celery worker process on the chosen queues
(:mod:`workers.supervisor`), or (``--no-supervise``, and in that child) run it in this process."""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals
from loguru import logger

from shared.celery_app import create_celery_app
from shared.cli_support import exit_code
from shared.errors import ChronoqError
from shared.redaction import redact_url
from shared.redis import preflight, resolve_redis
from shared.settings import AppSettings
from workers.hooks import install_worker_hooks
from workers.supervisor import EX_SOFTWARE, supervise
from workers.timers import TimerCompaction
from workers.transport import KEY_PREFIX_OPTION, SENTINEL_CHECK_OPTION, SENTINELS_OPTION

DEMO_TASK_MODULES = ("workers.tasks.demo",)
TASK_BASE = "workers.runtime:ChronoqTask"
UNENFORCED_LIMIT_POOLS = ("threads", "solo")
"""Pools that enforce neither ``time_limit`` nor ``soft_time_limit`` (prefork enforces both)."""


def create_worker_app(settings: AppSettings) -> Celery:
    """The worker's Celery app: chronoq's config, the demo tasks plus ``TASK_MODULES``, and the
    task base class that runs ``async def`` bodies. Becomes the current app, so modules that
    declare tasks with ``@shared_task`` register on it."""
    modules = list(dict.fromkeys([*DEMO_TASK_MODULES, *settings.task_modules]))
    app = create_celery_app(settings, task_modules=modules, task_cls=TASK_BASE, set_as_current=True)
    app.conf.update(
        # kombu's redis transport and Celery's consumer, with the reconnect race and poison
        # messages closed, no body in any log, and reconnects a second apart (see each module).
        broker_transport=(
            "workers.transport:SentinelTransport" if settings.redis.uses_sentinel else "workers.transport:Transport"
        ),
        worker_consumer="workers.consumer:Consumer",
        broker_transport_options={
            **app.conf.broker_transport_options,
            KEY_PREFIX_OPTION: settings.redis.key_prefix,
            SENTINEL_CHECK_OPTION: settings.redis.sentinel_check_s,
            SENTINELS_OPTION: tuple(settings.redis.sentinels),
        },
        # Wait for Redis for as long as it takes (Celery's default gives up after 100 tries).
        broker_connection_max_retries=None,
        # Tasks running when the connection drops run on (Celery 6 will cancel them): their ack
        # is lost with the connection, the message comes back after the visibility timeout,
        # and the run lease turns that copy away (the fire succeeded, or is still running).
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.steps["worker"].add(TimerCompaction)
    if settings.redis.uses_sentinel:
        # One URL: the Sentinels travel in SENTINELS_OPTION (see workers.transport.SentinelChannel).
        app.conf.broker_url = settings.broker_url().split(";", 1)[0]
    return app


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


def main(settings: AppSettings, child_command: Sequence[str] | None = None) -> int:
    """Run one worker until it is told to stop (SIGTERM or SIGINT: warm shutdown, exit 0).

    Redis is checked first (:func:`shared.redis.preflight`): wrong credentials, a TLS mistake or
    an evicting ``maxmemory-policy`` end the process at once with a clear message (78) instead
    of Celery retrying forever; an unreachable Redis gives 69. With ``child_command`` (how to
    start this worker with ``--no-supervise``) the Celery worker runs in that child process,
    restarted whenever it ends unasked (:func:`supervise`); without it, in this process
    (:func:`run_celery_worker`).
    """
    with resolve_redis(settings) as settings:
        try:
            preflight(settings)
        except ChronoqError as exc:  # credentials, TLS, eviction: 78; unreachable: 69
            logger.error("worker not started: {}", exc)
            return exit_code(exc)
        if child_command is None:
            return run_celery_worker(settings)
        # A missing task module is a configuration error of this process, said once here
        # rather than by every restarted child.
        for module in settings.task_modules:
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        # The child finds the same Redis, embedded here or not; everything else it reads from
        # the same environment and command line.
        env = {**os.environ, **settings.redis.child_env()}
        return supervise(child_command, env)


def run_celery_worker(settings: AppSettings) -> int:
    """The Celery worker itself, in this process. Exit status 0 only after a requested
    shutdown: a worker that stops on its own (Celery logs ``Unrecoverable error`` and exits 0)
    returns :data:`EX_SOFTWARE`."""
    install_worker_hooks(settings)
    app = create_worker_app(settings)
    argv = worker_argv(settings)
    warn_unenforced_limits(settings)
    requested: list[Any] = []

    def on_shutting_down(sig: Any = None, **_: Any) -> None:
        requested.append(sig)

    signals.worker_shutting_down.connect(on_shutting_down, weak=False, dispatch_uid="chronoq.requested")
    logger.info("starting worker {} broker={}", " ".join(argv[1:]), redact_url(settings.broker_url()))
    try:
        app.worker_main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    if code == 0 and not requested:
        logger.error("worker stopped without a shutdown request (see the error above): exit status {}", EX_SOFTWARE)
        return EX_SOFTWARE
    return code


def warn_unenforced_limits(settings: AppSettings) -> None:
    """Say at start, loudly, that this pool enforces no time limit (Celery's threads and solo
    pools do not; prefork enforces both the hard and the soft limit)."""
    pool = settings.worker.pool
    if pool in UNENFORCED_LIMIT_POOLS:
        logger.warning(
            "pool {} enforces no time limit (task_time_limit_s={}, and any job's time_limit): a task that "
            "overruns keeps running, and keeps its fire's slot of max_instances (the run lease is renewed) "
            "until it ends; run jobs with time limits on -P prefork",
            pool,
            settings.celery.task_time_limit_s,
        )
