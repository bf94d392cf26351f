"""The fleet-wide families of ``/metrics`` from one read of Redis (:class:`FleetSnapshot`):
outcome counters, skips by reason, the dispatch audit's findings, poison messages, the leader, replicas' and workers'
heartbeats, queue depths. Pure: the snapshot and the wall time in, families out; reading
Redis and the per-job series are :mod:`scheduler.fleetmetrics`'s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared.fleet import RECOVERY_REASONS, Outcome

WORKER_SEEN_S = 10.0
REPLICA_SEEN_S = 10.0
FLEET_OUTCOMES = tuple(o.value for o in Outcome if o is not Outcome.BUFFERED)


@dataclass
class FleetSnapshot:
    read_at: float
    counters: dict[str, int]
    leader: str | None
    replicas: dict[str, dict[str, Any]]
    workers: dict[str, dict[str, Any]]
    queues: dict[str, int]
    paused: set[str]
    buffered: set[str]
    last_fire: dict[str, float]
    job_fires: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    """Each labelled job's outcome counts, in :data:`FLEET_OUTCOMES` order (the ones it has)."""
    last_success: dict[str, float] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)


def fleet_families(snap: FleetSnapshot, wall: float) -> Iterator[Metric]:
    """The fleet-wide families of ``snap``, heartbeats judged against ``wall``."""
    fires = CounterMetricFamily(
        "chronoq_fires", "Fires by final outcome over the whole fleet (from Redis's counters)", labels=["outcome"]
    )
    for outcome in FLEET_OUTCOMES:
        fires.add_metric([outcome], snap.counters.get(outcome, 0))
    yield fires
    skipped = CounterMetricFamily(
        "chronoq_fires_skipped", "Skipped fires over the whole fleet, by reason", labels=["reason"]
    )
    for reason in ("paused", "overlap", "other"):
        skipped.add_metric([reason], snap.counters.get(f"skipped_{reason}", 0))
    yield skipped
    recovered = CounterMetricFamily(
        "chronoq_fires_recovered",
        "Dispatched fires not started by the dispatch audit's look, by what it found and did",
        labels=["reason"],
    )
    for reason in RECOVERY_REASONS:
        recovered.add_metric([reason], snap.counters.get(f"recovered_{reason}", 0))
    yield recovered
    yield CounterMetricFamily(
        "chronoq_poison_messages", "Unreadable messages workers set aside", value=snap.counters.get("poison", 0)
    )
    yield GaugeMetricFamily(
        "chronoq_fleet_leader_present", "1 while some replica holds the leader lease", value=int(bool(snap.leader))
    )
    yield from _beats(snap, wall)
    depth = GaugeMetricFamily("chronoq_queue_length", "Messages waiting in a broker queue", labels=["queue"])
    for name, length in snap.queues.items():
        depth.add_metric([name], length)
    yield depth


def _beats(snap: FleetSnapshot, wall: float) -> Iterator[Metric]:
    replica_beat = GaugeMetricFamily(
        "chronoq_replica_heartbeat_timestamp_seconds",
        "Last heartbeat of each scheduler replica",
        labels=["replica"],
    )
    seen = 0
    for replica, info in snap.replicas.items():
        beat = int(info.get("heartbeat_ms", 0)) / 1000
        replica_beat.add_metric([replica], beat)
        seen += wall - beat <= REPLICA_SEEN_S
    yield replica_beat
    yield GaugeMetricFamily("chronoq_replicas_seen", f"Replicas that beat within {REPLICA_SEEN_S:g}s", value=seen)
    worker_beat = GaugeMetricFamily(
        "chronoq_worker_heartbeat_timestamp_seconds", "Last heartbeat of each chronoq worker", labels=["worker"]
    )
    seen = 0
    for worker, info in snap.workers.items():
        beat = int(info.get("last_seen_ms", 0)) / 1000
        worker_beat.add_metric([worker], beat)
        seen += wall - beat <= WORKER_SEEN_S
    yield worker_beat
    yield GaugeMetricFamily("chronoq_workers_seen", f"Workers that beat within {WORKER_SEEN_S:g}s", value=seen)
