"""Supervision of the Celery worker process: restart it when it ends without being asked to.

A Celery worker can end on its own: an error that escapes its consumer (a kombu race on a
Redis restart, see :mod:`workers.transport`) logs ``Unrecoverable error`` and exits, with
status 0 at that. ``chronoq worker`` therefore runs the Celery worker as a child process and
:func:`supervise` watches it:

- the child ends without a requested shutdown (any status): it is started again after a
  backoff (:data:`BACKOFF_FIRST_S`, doubling to :data:`BACKOFF_MAX_S`). Nothing is lost: every
  message it had taken is still in the broker's unacked index and is handed out again after the
  visibility timeout, and the run lease turns away a second copy of a fire that is running;
- it ends :data:`GIVE_UP_RESTARTS` times within :data:`GIVE_UP_WINDOW_S`, or with status 78
  (a configuration error): the supervisor gives up with one line and a non-zero status
  (:data:`EX_SOFTWARE`, or the child's 78), so systemd or Kubernetes take over;
- it ends with 69 (Redis unreachable at its start, e.g. restarted during an outage): it is
  started again every :data:`UNAVAILABLE_RETRY_S`, for as long as Redis stays away, without
  counting towards giving up;
- SIGTERM or SIGINT to the supervisor: a warm shutdown is forwarded (SIGTERM) to the child, and
  the supervisor exits 0 once it has ended. Exit 0 always means a requested shutdown.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from types import FrameType

from loguru import logger

from shared.errors import EX_CONFIG, EX_UNAVAILABLE

EX_SOFTWARE = 70  # sysexits.h: internal software error (the worker kept dying)
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
UNAVAILABLE_RETRY_S = 1.0
GIVE_UP_RESTARTS = 5
GIVE_UP_WINDOW_S = 60.0


def backoff_s(recent_restarts: int) -> float:
    """Seconds to wait before restart number ``recent_restarts`` (1-based) of the window."""
    return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, recent_restarts - 1)))


def supervise(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` (the Celery worker) until a requested shutdown; returns the exit status.

    Installs SIGTERM and SIGINT handlers for its duration (call it from the main thread)."""
    stop = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # warm shutdown; Celery's SIGINT twice would be cold

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    restarts: deque[float] = deque()
    try:
        while True:
            child = subprocess.Popen(list(command), env=dict(env) if env is not None else None)
            if stop.is_set():  # a signal came before the child existed
                child.send_signal(signal.SIGTERM)
            code = child.wait()
            if stop.is_set():
                return 0 if code in (0, -signal.SIGTERM) else code
            if code == EX_CONFIG:
                logger.error("worker gave up: the Celery worker exited {} (a configuration error, see above)", code)
                return code
            if code == EX_UNAVAILABLE:
                logger.warning(
                    "Celery worker found Redis unreachable: starting it again in {:g} s", UNAVAILABLE_RETRY_S
                )
                if stop.wait(UNAVAILABLE_RETRY_S):
                    return 0
                continue
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > GIVE_UP_WINDOW_S:
                restarts.popleft()
            if len(restarts) >= GIVE_UP_RESTARTS:
                logger.error(
                    "worker gave up: the Celery worker ended {} times in {:g} s without a shutdown request "
                    "(last exit status {})",
                    len(restarts),
                    GIVE_UP_WINDOW_S,
                    code,
                )
                return EX_SOFTWARE
            delay_s = backoff_s(len(restarts))
            logger.error(
                "Celery worker ended without a shutdown request (exit status {}): restarting it in {:g} s "
                "(restart {} of {} allowed in {:g} s)",
                code,
                delay_s,
                len(restarts),
                GIVE_UP_RESTARTS - 1,
                GIVE_UP_WINDOW_S,
            )
            if stop.wait(delay_s):
                return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
