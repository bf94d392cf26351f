"""What ``serve()`` runs beside the service: the local worker (embedded Redis) and the job file
watcher (``--watch``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from loguru import logger

from shared.settings import AppSettings

SHUTDOWN_BUDGET_S = 10.0


RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STEADY_S = 60.0
"""A local worker that ran this long before it ended starts again after RESTART_FIRST_S."""


class LocalWorker:
    """``chronoq worker`` for both queues, beside the scheduler, in its own session.

    A thread waits on the process, so that one that ends is reaped at once (never left a
    zombie) and its status logged. One that ends unasked is started again, after 1 s doubling
    to 30 s (as a service manager would: a worker exits 69 when Redis or its Sentinels cannot
    be reached at start). :meth:`terminate` asks it to stop (its warm shutdown runs alongside
    the scheduler's); :meth:`stop` waits for it, and kills its session after half the
    scheduler's shutdown budget.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.env = {**os.environ, **settings.redis.child_env()}
        # The scheduler's own prometheus_client files (scheduler.metrics.share_values): a user's
        # task module using prometheus_client must not write its metrics among the scheduler's.
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> LocalWorker:
        with self._lock:
            self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="chronoq-local-worker", daemon=True)
        self._watcher.start()
        return self

    def _spawn(self) -> None:
        # `chronoq worker` (by module name: the scheduler never imports workers/), without the
        # working directory put first on the path; the command adds it last, as for any worker.
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "chronoq", "worker", "--hostname", f"local@{os.uname().nodename}"],
            env=self.env,
            start_new_session=True,
        )
        self.starts += 1
        logger.info("started a local worker pid={} for both queues (--no-worker to skip)", self.process.pid)

    def _watch(self) -> None:
        delay_s = RESTART_FIRST_S
        while True:
            process = self.process
            assert process is not None
            started = time.monotonic()
            code = process.wait()  # reaps it the moment it ends
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STEADY_S:
                delay_s = RESTART_FIRST_S
            logger.error(
                "local worker pid={} exited with status {}: starting another in {:g}s", process.pid, code, delay_s
            )
            if self._stopping.wait(delay_s):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn()
            delay_s = min(delay_s * 2, RESTART_MAX_S)

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM), and never start another."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """:meth:`terminate`, then wait for the worker; its session is killed after
        ``SHUTDOWN_BUDGET_S / 2``."""
        self.terminate()
        process = self.process
        if process is not None:
            try:
                process.wait(SHUTDOWN_BUDGET_S / 2)
            except subprocess.TimeoutExpired:
                logger.warning("local worker did not stop in time; killing it")
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the supervisor and its Celery worker
                process.wait(5)
        if self._watcher is not None:
            self._watcher.join(5)


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
