"""A task for the fault suite's ground truth: every run is written to a second Redis, one the
test never restarts, so what ran is known whatever happens to the broker.

Workers load it through ``TASK_MODULES=tests.faults.ledger_tasks``; ``FAULTS_LEDGER_URL`` names
the ledger Redis. Each run appends ``start`` (and ``end`` unless it was killed) to the list
``ledger``: ``{event, job_id, scheduled_at, task_id, pid, ms}``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import shared_task

LEDGER_KEY = "ledger"
_clients: dict[int, redis.Redis] = {}
_lock = threading.Lock()


def _ledger() -> redis.Redis:
    with _lock:
        client = _clients.get(os.getpid())
        if client is None:
            client = _clients[os.getpid()] = redis.Redis.from_url(os.environ["FAULTS_LEDGER_URL"], socket_timeout=5)
        return client


def _write(event: str, request: Any) -> None:
    headers = request.headers or {}
    entry = {
        "event": event,
        "job_id": getattr(request, "job_id", None) or headers.get("job_id"),
        "scheduled_at": getattr(request, "scheduled_at", None) or headers.get("scheduled_at"),
        "task_id": request.id,
        "pid": os.getpid(),
        "ms": int(time.time() * 1000),
    }
    _ledger().rpush(LEDGER_KEY, json.dumps(entry))


@shared_task(name="faults.ledger", bind=True)  # type: ignore[untyped-decorator,misc]
def ledger(self: Any, seconds: float = 0.0) -> None:
    """Record the run, sleep ``seconds`` (a long or never-ending task), record its end."""
    _write("start", self.request)
    if seconds:
        time.sleep(seconds)
    _write("end", self.request)


@shared_task(name="faults.ledger_no_result", bind=True, ignore_result=True)  # type: ignore[untyped-decorator,misc]
def ledger_no_result(self: Any) -> None:
    """Record the run; stores no result (nor a STARTED state): it runs on a Redis at maxmemory."""
    _write("start", self.request)


def read_ledger(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(item) for item in client.lrange(LEDGER_KEY, 0, -1)]


def peak_concurrency(entries: list[dict[str, Any]], job_id: str, now_ms: int) -> int:
    """The most runs of ``job_id`` that overlapped (a run without ``end`` lasts until ``now_ms``)."""
    spans: dict[str, list[int]] = {}
    for entry in entries:
        if entry["job_id"] == job_id:
            key = f"{entry['task_id']}:{entry['pid']}"
            spans.setdefault(key, [entry["ms"], now_ms])
            if entry["event"] == "end":
                spans[key][1] = entry["ms"]
    edges = sorted([(start, 1) for start, _ in spans.values()] + [(end, -1) for _, end in spans.values()])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak
