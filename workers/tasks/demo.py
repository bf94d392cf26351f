"""Demo tasks: what the shipped job file and the docs' examples run.

Tasks are declared with ``@shared_task`` and an explicit name, the pattern for users' own task
modules too: they register on whichever app the worker builds, and the scheduler sends them by
name without importing this module.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from celery import shared_task
from loguru import logger

from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT
from workers.hooks import worker_fleet
from workers.requests import header

EXECUTIONS_KEY = "executions"
"""``<prefix>executions``: the list :func:`record_fire` appends to, one JSON line per run."""


class TransientError(Exception):
    """An error worth retrying (a flaky dependency)."""


@shared_task(
    name="demo.number_sum",
    bind=True,
    autoretry_for=(TransientError,),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=False,
    max_retries=5,
)
def number_sum(self: Any, x: int | float | list[int | float], y: int | float = 0, fail_times: int = 0) -> int | float:
    """``x + y``; ``x`` may be a list (a chord's results), which is summed first.

    ``fail_times`` makes the first N attempts raise :class:`TransientError`, retried with
    exponential backoff (1 s, 2 s, 4 s...): a way to see retries happen.
    """
    if self.request.retries < fail_times:
        raise TransientError(f"transient failure {self.request.retries + 1} of {fail_times}")
    total = sum(x) if isinstance(x, list) else x
    logger.info("number_sum {} + {} = {}", x, y, total + y)
    return total + y


@shared_task(name="demo.sleep")
def sleep(seconds: float) -> float:
    """Sleep ``seconds`` (blocking) and return it."""
    time.sleep(seconds)
    return seconds


@shared_task(name="demo.async_sleep", bind=True)
async def async_sleep(self: Any, seconds: float) -> dict[str, Any]:
    """Await ``asyncio.sleep(seconds)`` on the worker process's event loop.

    Returns which process and loop ran it, so callers can see the loop is long-lived.
    """
    await asyncio.sleep(seconds)
    logger.info("async_sleep slept {}s", seconds)
    return {"slept": seconds, "pid": os.getpid(), "loop_id": id(asyncio.get_running_loop()), "task_id": self.request.id}


@shared_task(name="demo.record_fire", bind=True)
def record_fire(self: Any, seconds: float = 0.0, until: str | None = None) -> dict[str, Any]:
    """Append which fire ran where to the Redis list ``<prefix>executions``, sleep ``seconds``
    (blocking), return the entry: what fleet tests count to see what the workers executed.
    With ``until``, it returns as soon as the key ``<prefix><until>`` exists, ``seconds`` at
    most: a run that lasts exactly as long as a test needs it to, whatever the machine's load.

    The entry is ``{"job_id", "scheduled_at", "task_id", "worker", "pid", "started_ms"}``;
    ``job_id``/``scheduled_at`` are None for an ad-hoc call.
    """
    fleet = worker_fleet()
    request = self.request
    entry = {
        "job_id": header(request, HEADER_JOB_ID),
        "scheduled_at": header(request, HEADER_SCHEDULED_AT),
        "task_id": request.id,
        "worker": fleet.hostname,
        "pid": os.getpid(),
        "started_ms": int(time.time() * 1000),
    }
    fleet.client.rpush(fleet.keys.key(EXECUTIONS_KEY), json.dumps(entry))
    if until is None:
        time.sleep(seconds)
        return entry
    deadline = time.monotonic() + seconds
    while not fleet.client.exists(fleet.keys.key(until)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return entry
