"""Worker signal wiring: logging in every process, log context per task, and the
:class:`~workers.lease.WorkerFleet` (run lease, outcomes, heartbeat) connected to Celery's
signals; :func:`worker_fleet` answers which fleet this process runs.
"""

from __future__ import annotations

from typing import Any

from celery import signals
from loguru import logger

from shared.logging import bind_context, configure_logging, reset_context
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID
from shared.settings import AppSettings
from workers.lease import WorkerFleet
from workers.requests import header
from workers.runtime import ChronoqTask, runtime

_tokens: dict[str, Any] = {}
_fleet: WorkerFleet | None = None


def install_worker_hooks(settings: AppSettings) -> None:
    """Connect the handlers and make :func:`worker_fleet` answer (once per process;
    connecting twice is harmless)."""
    global _fleet
    fleet = WorkerFleet(settings)
    _fleet = fleet
    ChronoqTask.run_guard = fleet

    def on_setup_logging(**_: Any) -> None:
        # Connecting here at all stops Celery from configuring logging itself.
        configure_logging(settings, process="worker")

    def on_process_init(**_: Any) -> None:
        configure_logging(settings, process="worker")

    connections: list[tuple[Any, Any, str]] = [
        (signals.setup_logging, on_setup_logging, "setup_logging"),
        (signals.worker_process_init, on_process_init, "process_init"),
        (signals.task_prerun, _bind_task_context, "prerun"),
        (signals.task_postrun, _unbind_task_context, "postrun"),
        (signals.worker_process_shutdown, _shutdown_runtime, "process_shutdown"),
        (signals.worker_shutdown, _shutdown_runtime, "shutdown"),
        (signals.worker_ready, _announce_ready, "ready"),
        (signals.celeryd_init, fleet.on_celeryd_init, "fleet.init"),
        (signals.task_received, fleet.on_received, "fleet.received"),
        (signals.task_success, fleet.on_success, "fleet.success"),
        (signals.task_failure, fleet.on_failure, "fleet.failure"),
        (signals.task_retry, fleet.on_retry, "fleet.retry"),
        (signals.task_revoked, fleet.on_revoked, "fleet.revoked"),
        (signals.task_unknown, fleet.on_unknown, "fleet.unknown"),
        (signals.task_postrun, fleet.on_postrun, "fleet.postrun"),
        (signals.worker_ready, fleet.on_worker_ready, "fleet.ready"),
        (signals.worker_shutdown, fleet.on_worker_shutdown, "fleet.shutdown"),
    ]
    for signal, handler, uid in connections:
        signal.connect(handler, weak=False, dispatch_uid=f"chronoq.{uid}")


def worker_fleet() -> WorkerFleet:
    """This worker's :class:`WorkerFleet` (its settings, Redis client and key layout), for tasks
    that need them. Raises ``RuntimeError`` outside a worker started by :func:`workers.main`."""
    if _fleet is None:
        raise RuntimeError("no worker fleet: install_worker_hooks(settings) was not called in this process")
    return _fleet


def _bind_task_context(task_id: str, task: Any, **_: Any) -> None:
    request = task.request
    _tokens[task_id] = bind_context(
        task_id=task_id,
        job_id=header(request, HEADER_JOB_ID),
        scheduled_at=header(request, HEADER_SCHEDULED_AT),
        trace_id=header(request, HEADER_TRACE_ID) or task_id,
    )


def _unbind_task_context(task_id: str, **_: Any) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        reset_context(token)


def _shutdown_runtime(**_: Any) -> None:
    runtime.shutdown()


def _announce_ready(sender: Any = None, **_: Any) -> None:
    logger.info("worker ready hostname={}", getattr(sender, "hostname", "?"))
