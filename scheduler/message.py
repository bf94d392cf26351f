"""A Celery task message as the scheduler builds it, before it is encoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskMessage:
    """One task message, as ``app.send_task(task_name, args, kwargs, queue=..., task_id=...,
    headers=..., priority=..., expires=..., time_limit=..., soft_time_limit=...)`` takes it.

    ``headers`` are custom message headers (``job_id``, ``scheduled_at``, ``trace_id``); a worker
    exposes them as attributes of ``task.request``. They must not reuse a protocol header name
    (``id``, ``task``, ``eta``...). ``priority`` is 0-9; kombu's Redis transport consumes *lower*
    numbers first and folds them into its priority steps (default 0, 3, 6, 9). ``expires_s`` is
    relative to the moment of publishing and may be negative (the worker then revokes the task
    as expired). ``delivery_tag`` "" is the task id. ``time_limit_s``/``soft_time_limit_s`` None: the worker's configured limits.
    """

    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    task_id: str
    headers: dict[str, str] = field(default_factory=dict)
    priority: int | None = None
    expires_s: float | None = None
    time_limit_s: int | None = None
    soft_time_limit_s: int | None = None
    delivery_tag: str = ""
    """kombu's delivery tag (its key in the broker's unacked hash); "": the task id. A fire's
    message is found there by its task id (:mod:`scheduler.audit`); a copy the dispatch audit
    publishes again has a tag of its own (:func:`scheduler.encoder.republish_tag`)."""

    def __post_init__(self) -> None:
        if self.priority is not None and not 0 <= self.priority <= 9:
            raise ValueError(f"task {self.task_id}: priority must be 0-9 or None, not {self.priority}")
