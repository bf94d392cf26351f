"""Running ``async def`` task bodies: one long-lived event loop per worker process.

A new event loop per task (``asyncio.run`` in each call) would throw away connection pools
and cost a loop start-up per task. Instead each process gets one anyio blocking portal (an
event loop in a daemon thread), created lazily after the pool forks and stopped at process
shutdown. Every pool kind works: prefork (one loop per child), threads (one loop shared by the
threads), solo.

Before any body runs, sync or async, :class:`ChronoqTask` asks its :class:`RunGuard` (the
worker's fire ledger, installed by :func:`workers.hooks.install_worker_hooks`) whether this
delivery may run at all.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import ExitStack
from contextvars import ContextVar
from typing import Any, ClassVar, Protocol

import redis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from celery import Task, states
from celery.app.task import get_actual_ignore_result
from celery.exceptions import BackendStoreError
from kombu.exceptions import OperationalError
from loguru import logger

from shared.logging import current_context, log_context

_async_request: ContextVar[Any] = ContextVar("chronoq_async_request", default=None)


class AsyncRuntime:
    """The per-process event loop. Thread-safe; survives fork by starting anew in the child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._stack: ExitStack | None = None
        self._portal: BlockingPortal | None = None

    def _ensure_portal(self) -> BlockingPortal:
        with self._lock:
            if self._portal is None or self._pid != os.getpid():
                # After a fork the parent's loop thread does not exist in the child.
                self._stack = ExitStack()
                self._portal = self._stack.enter_context(start_blocking_portal(backend="asyncio"))
                self._pid = os.getpid()
            return self._portal

    def run(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``await func(*args)`` on the loop and return its result (or raise its error).

        If the calling thread is interrupted (a soft time limit), the coroutine is cancelled.
        """
        future = self._ensure_portal().start_task_soon(func, *args)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def shutdown(self) -> None:
        """Stop the loop thread if this process started one. Idempotent."""
        with self._lock:
            if self._stack is not None and self._pid == os.getpid():
                self._stack.close()
            self._stack, self._portal, self._pid = None, None, None


runtime = AsyncRuntime()


class RunGuard(Protocol):
    """Decides whether one delivery of a task may run its body."""

    def admit(self, task: Task, request: Any) -> None:
        """Return to let the body run; raise ``celery.exceptions.Ignore`` (drop the delivery,
        ack it, store nothing) or ``Reject`` to keep it from running."""


class ChronoqTask(Task):  # type: ignore[misc]
    """Task base class of chronoq's workers: runs ``async def`` bodies on the process loop.

    Inside an async body ``self.request`` works as in a sync task (it is carried in a context
    variable, since the loop thread is shared by concurrent tasks), and so do ``self.retry()``
    and the log context (task_id, job_id, trace_id).
    """

    run_guard: ClassVar[RunGuard | None] = None
    """Asked before every body runs in a worker (never for a direct call); None: all run."""
    report_started: ClassVar[bool] = True
    """Store STARTED (with pid and hostname, as Celery's ``task_track_started`` does) when a
    delivery is admitted, right before the body runs. Celery's own tracking is off
    (shared/celery_app.py): it stores STARTED before any task code runs, so a duplicate that
    the run guard turns away would replace the running attempt's STARTED (and, racing its
    SUCCESS, could replace that). A task that sets ``track_started=True`` itself gets Celery's
    behaviour instead."""

    def _store_started(self, request: Any) -> None:
        # Informational: a result backend that cannot take it (Redis restarting) must not fail
        # the task before its body ran; an admitted fire would be recorded failed and never run.
        try:
            self.backend.store_result(
                request.id, {"pid": os.getpid(), "hostname": request.hostname}, states.STARTED, request=request
            )
        # BackendStoreError: Celery's retries of the store ran out (result_backend_always_retry),
        # as when a SIGKILLed master's writes are not confirmed by a replica (WAIT).
        except (redis.RedisError, OSError, OperationalError, BackendStoreError) as exc:
            logger.warning("STARTED state not stored task_id={}: {}", request.id, type(exc).__name__)

    @property
    def request(self) -> Any:
        carried = _async_request.get()
        return carried if carried is not None else self._get_request()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self._get_request()
        guard = self.run_guard
        if guard is not None and not request.called_directly:
            # Here rather than in a prerun signal: an exception raised here is the task's own,
            # so Celery handles Ignore/Reject as it would from the body, in every pool.
            guard.admit(self, request)
        if self.report_started and not self.track_started and _in_worker(self, request):
            self._store_started(request)
        result = super().__call__(*args, **kwargs)
        if not inspect.iscoroutine(result):
            return result
        return runtime.run(_with_request, result, self._get_request(), current_context())


def _in_worker(task: Task, request: Any) -> bool:
    """Run by a worker (not called directly, not eagerly) and its result is stored."""
    if request.called_directly or request.is_eager:
        return False
    return not get_actual_ignore_result(task, request)


async def _with_request(coro: Coroutine[Any, Any, Any], request: Any, context: dict[str, str]) -> Any:
    _async_request.set(request)
    with log_context(**context):
        return await coro
