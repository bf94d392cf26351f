"""Which jobs name a task that no live worker has registered (``chronoq status`` warns).

Workers publish the task names they registered in their heartbeat (``<prefix>workers``); the
scheduler replicas publish every job's spec (``<prefix>jobs``). Both are read as they are
stored, so the check needs no import of either side. ``chronoq scheduler --check`` stays free
of Redis and so does not make it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

WORKER_LIVE_S = 10.0
"""A worker whose last heartbeat is older than this does not count."""


def unserved_tasks(jobs: Mapping[Any, Any], workers: Mapping[Any, Any], now_ms: int) -> dict[str, list[str]]:
    """Task name -> the job ids that fire it, for each task no live worker has registered.

    ``jobs`` and ``workers`` are the raw hashes (id -> JSON). Empty when no live worker exists
    (nothing to compare against) or when a live worker does not say what it registered (a
    worker older than this check): then nothing can be said for sure.
    """
    registered: set[str] = set()
    live = 0
    for raw in workers.values():
        beat = json.loads(raw)
        if now_ms - int(beat.get("last_seen_ms", 0)) > WORKER_LIVE_S * 1000:
            continue
        if "tasks" not in beat:
            return {}
        live += 1
        registered.update(beat["tasks"])
    if not live:
        return {}
    unserved: dict[str, list[str]] = {}
    for job_id, raw in sorted(jobs.items()):
        task = json.loads(raw).get("task")
        if task and task not in registered:
            unserved.setdefault(str(task), []).append(str(job_id))
    return unserved
