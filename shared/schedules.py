"""Declaring a schedule next to a task, in the task's own module.

>>> @schedule(id="nightly-report", cron="0 2 * * *", kwargs={"fmt": "pdf"})
... @shared_task(name="reports.build")
... def build(fmt: str) -> None: ...

The scheduler imports the modules named in ``TASK_MODULES`` once at start, collects what they
declared with :func:`declared_schedules`, and from then on sends by task name: it never calls
task code. A declaration takes every job-file key (``cron``/``interval``/``date``, ``args``,
``kwargs``, ``queue``, ``jitter``...); ``task`` defaults to the decorated task's name.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# module name -> declarations made while importing it
_declared: dict[str, list[dict[str, Any]]] = {}


def schedule(**job: Any) -> Callable[[T], T]:
    """Declare a schedule for the decorated task (a Celery task or a plain function).

    Put it above ``@shared_task(name=...)`` so the task's name is used, or pass ``task=``.
    """
    module = sys._getframe(1).f_globals.get("__name__", "?")

    def declare(target: T) -> T:
        entry = dict(job)
        if "task" not in entry:
            name = getattr(target, "name", None)
            entry["task"] = name if isinstance(name, str) else f"{module}.{getattr(target, '__name__', '?')}"
        entry.setdefault("id", entry["task"])
        _declared.setdefault(module, []).append(entry)
        return target

    return declare


def declared_schedules(modules: Sequence[str]) -> list[dict[str, Any]]:
    """Import ``modules`` and return the schedules they declared, in declaration order."""
    found: list[dict[str, Any]] = []
    for name in modules:
        importlib.import_module(name)
        found += [dict(entry) for entry in _declared.get(name, [])]
    return found
