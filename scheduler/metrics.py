"""What one replica measures about itself, in Prometheus terms (``prometheus_client``).

The code paths that do the work call :class:`ReplicaMetrics` directly (the dispatcher observes
each decide call and each dispatched fire's lag; the loop heartbeat its own lag) or keep plain
counters that are read at scrape time (leadership, reloads). The pure planner knows nothing of
it. Fleet-wide numbers, the same on every replica, come from Redis instead
(:mod:`scheduler.fleetmetrics`).

Names follow Prometheus' conventions: base units (seconds), ``_total`` for counters,
``_timestamp_seconds`` for instants.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    values,
)

from shared.fleet import Outcome

if TYPE_CHECKING:
    from scheduler.fires import Fire

LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def chronoq_version() -> str:
    try:
        return version("chronoq")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def share_values(directory: Path) -> None:
    """From now on, every metric this process creates keeps its values in ``prometheus_client``'s
    multiprocess files under ``directory`` (its ``PROMETHEUS_MULTIPROC_DIR`` mode), where the
    metrics server process reads them (:mod:`scheduler.metricsd`). Process-wide, and only for
    metrics created after the call: ``serve()`` calls it before building :class:`ReplicaMetrics`.
    prometheus_client picks the mode from the environment when first imported; this switches it
    at run time instead, the same way (its ``values.ValueClass``)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class ReplicaMetrics:
    """The replica's own metrics, in their own registry (nothing global: tests build several).

    Gauges say how the metrics server merges them (``multiprocess_mode``): one process writes
    them, so the most recent value is the value, with no ``pid`` label."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; the *_created series only add noise here
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.fire_lag = Histogram(
            "chronoq_fire_lag_seconds",
            "Publish time minus nominal fire time of each fire this replica dispatched (jitter included)",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.decide_duration = Histogram(
            "chronoq_decide_duration_seconds",
            "Duration of one decide call (one Lua script deciding and publishing a batch)",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.decide_batch = Histogram(
            "chronoq_decide_batch_size", "Fires per decide call", buckets=BATCH_BUCKETS, registry=r
        )
        self.decisions = Counter(
            "chronoq_replica_decisions", "Fires this replica decided, by outcome", ["outcome"], registry=r
        )
        for outcome in (Outcome.DISPATCHED, Outcome.COALESCED, Outcome.SKIPPED, Outcome.MISSED, Outcome.BUFFERED):
            self.decisions.labels(outcome.value)
        self.loop_lag = Histogram(
            "chronoq_event_loop_lag_seconds",
            "How much later than asked the event loop woke the heartbeat",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.redis_errors = Counter(
            "chronoq_redis_errors", "Redis calls that failed, by operation", ["operation"], registry=r
        )
        for operation in ("decide", "lease", "control", "events"):
            self.redis_errors.labels(operation)
        self.decide_retries = Counter("chronoq_decide_retries", "Decide calls retried after a Redis error", registry=r)
        self.leader = Gauge(
            "chronoq_leader", "1 while this replica holds the leader lease", registry=r, multiprocess_mode="mostrecent"
        )
        self.lease_lost = Counter(
            "chronoq_leader_lease_lost", "Times this replica found it had lost the leader lease", registry=r
        )
        self.reloads = Counter("chronoq_reloads", "Job file reloads, by result", ["result"], registry=r)
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        self.last_reload = Gauge(
            "chronoq_last_reload_success_timestamp_seconds",
            "When the job files were last loaded successfully (start or reload)",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.files_rejected = Counter(
            "chronoq_job_files_rejected", "Job file problems that made a reload be rejected", registry=r
        )
        self.sent_events = Counter(
            "chronoq_task_sent_events", "Celery task-sent events published for dispatched fires", registry=r
        )
        Gauge(
            "chronoq_build_info",
            "chronoq's version and Python's, as labels (always 1)",
            ["version", "python_version"],
            registry=r,
            multiprocess_mode="mostrecent",
        ).labels(chronoq_version(), platform.python_version()).set(1)
        self.last_reload.set(time.time())

    def observe_decide(self, fires: Sequence[Fire], results: Sequence[str], duration_s: float, done_ts: float) -> None:
        """One decide call: its duration and size, and each fire it dispatched (lag)."""
        self.decide_duration.observe(duration_s)
        self.decide_batch.observe(len(fires))
        lag, counts = self.fire_lag, dict[str, int]()
        for fire, result in zip(fires, results, strict=True):
            if result == "decided":
                continue
            counts[result] = counts.get(result, 0) + 1
            if result == Outcome.DISPATCHED:
                lag.observe(max(0.0, done_ts - fire.scheduled_at.timestamp()))
        for result, count in counts.items():
            self.decisions.labels(result).inc(count)

    def reload(self, applied: bool, problems: int = 0, when: datetime | None = None) -> None:
        self.reloads.labels("applied" if applied else "rejected").inc()
        if applied:
            self.last_reload.set(when.timestamp() if when else time.time())
        else:
            self.files_rejected.inc(problems)
