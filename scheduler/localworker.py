"""What ``serve()`` runs beside the service: the local worker (embedded Redis) and the job file
watcher (``--watch``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from loguru import logger

from shared.settings import AppSettings

SHUTDOWN_BUDGET_S = 10.0


def start_local_worker(settings: AppSettings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.redis.child_env()}
    # The scheduler's own prometheus_client files (scheduler.metrics.share_values): a user's
    # task module using prometheus_client must not write its metrics among the scheduler's.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # `chronoq worker` (by module name: the scheduler never imports workers/), without the
    # working directory put first on the path; the command adds it last, as for any worker.
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "chronoq", "worker", "--hostname", f"local@{os.uname().nodename}"],
        env=env,
        start_new_session=True,
    )
    logger.info("started a local worker pid={} for both queues (--no-worker to skip)", process.pid)
    return process


def stop_local_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(SHUTDOWN_BUDGET_S / 2)
    except subprocess.TimeoutExpired:
        logger.warning("local worker did not stop in time; killing it")
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the supervisor and its Celery worker
        process.wait(5)


def _file_stamps(paths: list[Path]) -> list[tuple[float, int] | None]:
    stamps: list[tuple[float, int] | None] = []
    for path in paths:
        try:
            stat = path.stat()
            stamps.append((stat.st_mtime, stat.st_size))
        except OSError:
            stamps.append(None)
    return stamps


async def watch_job_files(paths: list[Path], interval_s: float, reload: Callable[[], Awaitable[bool]]) -> None:
    """Reload when a job file's mtime or size changes (``--watch``); forever."""
    seen = _file_stamps(paths)
    while True:
        await asyncio.sleep(interval_s)
        now = _file_stamps(paths)
        if now != seen:
            seen = now
            logger.info("job files changed; reloading")
            await reload()
