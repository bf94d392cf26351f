"""Processes ``chronoq scheduler`` may start next to the scheduler: the web console (``--web``,
what ``make run`` does). Each is its own process and stopped with the scheduler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from loguru import logger

STOP_S = 10.0


@contextmanager
def web_console(env_file: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``chronoq web`` with the same settings (it finds the same embedded Redis when no
    ``REDIS_URL`` is set); it prints its URL. Stopped (SIGTERM, then SIGKILL) on exit. A console
    that cannot start (its port taken) says why in one line; the scheduler runs on."""
    command = [sys.executable, "-m", "scheduler.cli", *(["--env-file", env_file] if env_file else []), "web"]
    process = subprocess.Popen(command, env=dict(os.environ), start_new_session=True)
    logger.info("started the web console pid={} (chronoq web; it prints its URL)", process.pid)
    stopping = threading.Event()

    def reap() -> None:  # at once, so that a console that ends early is never left a zombie
        code = process.wait()
        if not stopping.is_set():
            logger.warning("web console pid={} exited with status {}; the scheduler runs on", process.pid, code)

    threading.Thread(target=reap, name="chronoq-web-console", daemon=True).start()
    try:
        yield process
    finally:
        stopping.set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            logger.warning("web console did not stop in time; killing it")
            process.kill()
            process.wait(5)
