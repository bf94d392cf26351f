"""Every name two processes must agree on: message headers, task ids and the Redis key layout.

Queue names are settings (``CELERY_CRON_QUEUE``, ``CELERY_DEFAULT_QUEUE``); their defaults live
here. Every key chronoq itself writes starts with the configured prefix (``REDIS_KEY_PREFIX``,
default ``chronoq:``). The broker's lists and Celery's result keys keep Celery's own names, so a
plain Celery client can talk to a chronoq fleet and the other way round.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

DEFAULT_CRON_QUEUE = "cron_queue"
DEFAULT_ADHOC_QUEUE = "celery_queue"

HEADER_JOB_ID = "job_id"
HEADER_SCHEDULED_AT = "scheduled_at"
HEADER_TRACE_ID = "trace_id"

# Fixed forever: changing it changes every fire's task id and so breaks de-duplication.
_FIRE_NAMESPACE = uuid.UUID("6f1d4d0e-3f7a-5d7b-9a55-0c6e2f1b7c11")


def format_scheduled_at(when: datetime) -> str:
    """ISO-8601 UTC with a ``+00:00`` offset: the header's format.

    Whole seconds print without a fraction (``2026-03-29T01:00:00+00:00``); sub-second
    schedules keep their microseconds, so two fires never share a task id.
    """
    if when.tzinfo is None:
        raise ValueError("scheduled_at must be timezone-aware")
    return when.astimezone(UTC).isoformat()


def fire_task_id(job_id: str, scheduled_at: datetime) -> str:
    """The Celery task id of one fire: the same (job, nominal time) always gives the same id."""
    return str(uuid.uuid5(_FIRE_NAMESPACE, f"{job_id}|{format_scheduled_at(scheduled_at)}"))


def new_trace_id() -> str:
    """A fresh trace id for work that does not carry one yet."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The layout of chronoq's own keys under one prefix."""

    prefix: str

    def key(self, *parts: str) -> str:
        """``prefix`` followed by ``parts`` joined with ``:``."""
        return self.prefix + ":".join(parts)

    @property
    def last_fire(self) -> str:
        """Hash: job id -> JSON of the last fire dispatched (scheduled_at, dispatched_at, task_id)."""
        return self.key("last_fire")

    def fire_claim(self, job_id: str, scheduled_at: str) -> str:
        """String: who holds one (job, nominal time) fire: ``pending:<owner>`` or ``done:<task id>``."""
        return self.key("fire", job_id, scheduled_at)

    @property
    def counters(self) -> str:
        """Hash: outcome -> count, over every job, since the keys were created."""
        return self.key("counters")

    def job_counters(self, job_id: str) -> str:
        """Hash: outcome -> count for one job."""
        return self.key("counters", "job", job_id)

    def history(self, job_id: str) -> str:
        """List: the job's last fires, newest first, JSON each, trimmed to the history limit."""
        return self.key("history", job_id)

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key under the prefix."""
        return self.prefix + "*"
