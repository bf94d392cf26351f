"""Worker signal handlers: logging in every process, log context per task, clean shutdown."""

from __future__ import annotations

from typing import Any

from celery import signals
from loguru import logger

from shared.logging import bind_context, configure_logging, reset_context
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID
from shared.settings import AppSettings
from workers.runtime import runtime

_tokens: dict[str, Any] = {}


def install_worker_hooks(settings: AppSettings) -> None:
    """Connect the handlers (once per process; connecting twice is harmless)."""

    def on_setup_logging(**_: Any) -> None:
        # Connecting here at all stops Celery from configuring logging itself.
        configure_logging(settings, process="worker")

    def on_process_init(**_: Any) -> None:
        configure_logging(settings, process="worker")

    signals.setup_logging.connect(on_setup_logging, weak=False, dispatch_uid="chronoq.setup_logging")
    signals.worker_process_init.connect(on_process_init, weak=False, dispatch_uid="chronoq.process_init")
    signals.task_prerun.connect(_bind_task_context, weak=False, dispatch_uid="chronoq.prerun")
    signals.task_postrun.connect(_unbind_task_context, weak=False, dispatch_uid="chronoq.postrun")
    signals.worker_process_shutdown.connect(_shutdown_runtime, weak=False, dispatch_uid="chronoq.process_shutdown")
    signals.worker_shutdown.connect(_shutdown_runtime, weak=False, dispatch_uid="chronoq.shutdown")
    signals.worker_ready.connect(_announce_ready, weak=False, dispatch_uid="chronoq.ready")


def header(request: Any, name: str) -> str | None:
    """A custom message header of a task request (protocol 2 puts them on the request)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return None if value is None else str(value)


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
