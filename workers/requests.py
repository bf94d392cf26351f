"""What a task request tells the worker's fire ledger: the fire it carries (from its headers),
when its retry is due, its error in short, and whether the process that ran it is gone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psutil

from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT

ERROR_MAX_CHARS = 300


def header(request: Any, name: str) -> str | None:
    """A custom message header of a task request (protocol 2 puts them on the request)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return None if value is None else str(value)


def fire_of(request: Any) -> tuple[str, str] | None:
    """(job_id, scheduled_at) of a scheduled fire's request; None for ad-hoc work."""
    job_id, scheduled_at = header(request, HEADER_JOB_ID), header(request, HEADER_SCHEDULED_AT)
    return None if job_id is None or scheduled_at is None else (job_id, scheduled_at)


def retry_delay_s(when: Any) -> float:
    """Seconds until a retry is due, from ``Retry.when`` (seconds, or an ETA datetime where
    naive means UTC); 0 if unknown or past."""
    if isinstance(when, int | float):
        return max(0.0, float(when))
    if isinstance(when, datetime):
        due = when if when.tzinfo else when.replace(tzinfo=UTC)
        return max(0.0, (due - datetime.now(UTC)).total_seconds())
    return 0.0


def short_error(exc: BaseException) -> str:
    """``Type: message``, cut to :data:`ERROR_MAX_CHARS`."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS]


def pid_is_gone(pid: int) -> bool:
    """True if no process ``pid`` runs on this host (a zombie counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # it exists but we may not look at it


class Headers:
    """A message's header dict seen as a request (attributes), for :func:`fire_of`."""

    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers
