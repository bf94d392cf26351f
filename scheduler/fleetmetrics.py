"""Fleet-wide and per-job metrics: read from what Redis already holds, at scrape time.

Every replica exports the same fleet truth: the outcome counters the decide and finish scripts
keep (``counters``, ``counters:job:<job>``), the replicas' and workers' heartbeats, the leader
lease, queue depths, slots and waiting ``buffer_one`` fires. Each scrape reuses what was read
within ``HTTP_FLEET_CACHE_S``, so ten scrapes a second cost one read of Redis every two
seconds. While Redis does not answer, a scrape still answers: the replica's own and process
metrics, and ``chronoq_fleet_data_available 0`` (the failure is cached too, so scrapes never
queue up behind a dead Redis).

Per-job series (info, next/last fire, last success, paused, slots, waiting fire, outcomes)
exist for the first ``HTTP_JOB_LABEL_LIMIT`` jobs by id; the others are summed up under
``job="_other"`` (paused and waiting counts added; next fire: the earliest), so cardinality
stays bounded; only labelled jobs' series are read from Redis.

Runs in the HTTP server's threads with its own blocking client, never on the event loop; it
lets go of the GIL between families and every :data:`YIELD_EVERY` jobs, so the loop thread
never waits a whole scrape for it (a waiting thread gets the GIL only every 5 ms otherwise). The
job list and next fire times are this replica's (``manager.list()`` and APScheduler's next run
times, read without locking: a snapshot that may be one reload old).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from loguru import logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.specs import JobSpec
from scheduler.triggers import describe_trigger
from shared.fleet import Outcome
from shared.names import RedisKeys

OTHER = "_other"
"""The ``job`` label of the aggregate past ``HTTP_JOB_LABEL_LIMIT``."""
WORKER_SEEN_S = 10.0
REPLICA_SEEN_S = 10.0
YIELD_EVERY = 100
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
    job_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)


class FleetCollector(Collector):
    """A ``prometheus_client`` collector over Redis and the replica's job list."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        *,
        jobs: Callable[[], Sequence[JobSpec]],
        next_fires: Callable[[], dict[str, datetime | None]],
        queue_keys: dict[str, list[str]],
        label_limit: int,
        cache_s: float,
    ) -> None:
        self.client = client
        self.keys = keys
        self.jobs = jobs
        self.next_fires = next_fires
        self.queue_keys = queue_keys
        self.label_limit = label_limit
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._snapshot: FleetSnapshot | None = None
        self._failed_at = -float("inf")
        self._labelled: tuple[int, list[JobSpec]] = (-1, [])
        self.reads = 0
        """Times Redis was read (tests and the benchmark count them)."""

    # -- reading Redis, at most once per cache_s ------------------------------------------------

    def snapshot(self) -> FleetSnapshot | None:
        """The fleet data, from cache if fresh; None while Redis does not answer."""
        with self._lock:
            now = time.monotonic()
            snap = self._snapshot
            if snap is not None and now - snap.read_at < self.cache_s:
                return snap
            if now - self._failed_at < self.cache_s:
                return None
            try:
                self._snapshot = self._read(now)
            except (redis.RedisError, OSError, ValueError) as exc:
                logger.warning("metrics: fleet data not read from redis: {}", exc)
                self._snapshot, self._failed_at = None, now
            return self._snapshot

    def _read(self, now: float) -> FleetSnapshot:
        self.reads += 1
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(k.counters)
        pipe.get(k.leader)
        pipe.hgetall(k.replicas)
        pipe.hgetall(k.workers)
        pipe.hkeys(k.paused)
        pipe.smembers(k.buffered)
        labelled = self.labelled_jobs()
        ids = [spec.id for spec in labelled]
        if ids:
            pipe.hmget(k.last_fire, ids)
        names = list(self.queue_keys)
        for name in names:
            for key in self.queue_keys[name]:
                pipe.llen(key)
        for spec in labelled:
            pipe.hgetall(k.job_counters(spec.id))
            pipe.zcard(k.inflight(spec.id))
        replies = pipe.execute()
        counters, leader, replicas, workers, paused, buffered = replies[:6]
        last_fire = dict(zip(ids, replies[6], strict=True)) if ids else {}
        at = 7 if ids else 6
        queues = {}
        for name in names:
            n = len(self.queue_keys[name])
            queues[name] = sum(int(x) for x in replies[at : at + n])
            at += n
        snap = FleetSnapshot(
            read_at=now,
            counters={str(o): int(c) for o, c in counters.items()},
            leader=str(leader) if leader else None,
            replicas={str(r): json.loads(v) for r, v in replicas.items()},
            workers={str(w): json.loads(v) for w, v in workers.items()},
            queues=queues,
            paused={str(j) for j in paused},
            buffered={str(j) for j in buffered},
            last_fire={j: _epoch(json.loads(v)["scheduled_at"]) for j, v in last_fire.items() if v is not None},
        )
        for spec in labelled:
            raw, slots = replies[at], replies[at + 1]
            at += 2
            snap.job_counters[spec.id] = {str(o): int(c) for o, c in raw.items()}
            snap.inflight[spec.id] = int(slots)
        return snap

    def labelled_jobs(self) -> list[JobSpec]:
        """The first ``label_limit`` jobs by id (recomputed only when the job list changes)."""
        jobs = self.jobs()
        key = hash(tuple(id(spec) for spec in jobs)) if len(jobs) <= 100_000 else len(jobs)
        if self._labelled[0] != key:
            self._labelled = (key, sorted(jobs, key=lambda s: s.id)[: self.label_limit])
        return self._labelled[1]

    # -- exposition ------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield family
            time.sleep(0)  # between families (each is formatted in one go): the loop's turn

    def _families(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield GaugeMetricFamily(
            "chronoq_fleet_data_available",
            "1 when the last read of the fleet's state from Redis succeeded (within HTTP_FLEET_CACHE_S)",
            value=0 if snap is None else 1,
        )
        jobs = self.jobs()
        yield GaugeMetricFamily("chronoq_jobs", "Jobs this replica runs", value=len(jobs))
        if snap is None:
            return
        wall = time.time()
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
        yield CounterMetricFamily(
            "chronoq_poison_messages", "Unreadable messages workers set aside", value=snap.counters.get("poison", 0)
        )
        yield GaugeMetricFamily(
            "chronoq_fleet_leader_present", "1 while some replica holds the leader lease", value=int(bool(snap.leader))
        )
        yield from self._beats(snap, wall)
        depth = GaugeMetricFamily("chronoq_queue_length", "Messages waiting in a broker queue", labels=["queue"])
        for name, length in snap.queues.items():
            depth.add_metric([name], length)
        yield depth
        yield from self._per_job(snap, jobs)

    def _beats(self, snap: FleetSnapshot, wall: float) -> Iterator[Metric]:
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

    def _per_job(self, snap: FleetSnapshot, jobs: Sequence[JobSpec]) -> Iterator[Metric]:
        labelled = self.labelled_jobs()
        named = {spec.id for spec in labelled}
        others = [spec for spec in jobs if spec.id not in named]
        next_fires = self.next_fires()
        info = GaugeMetricFamily(
            "chronoq_job_info",
            "Each job's definition, as labels (always 1)",
            labels=["job", "task", "trigger", "schedule", "timezone", "queue", "overlap", "source"],
        )
        gauges = {
            name: GaugeMetricFamily(name, text, labels=["job"])
            for name, text in (
                ("chronoq_job_next_fire_timestamp_seconds", "Next nominal fire time of the job on this replica"),
                ("chronoq_job_last_fire_timestamp_seconds", "Nominal time of the job's last dispatched fire"),
                ("chronoq_job_last_success_timestamp_seconds", "When a run of the job last succeeded"),
                ("chronoq_job_paused", "1 while the job is paused"),
                ("chronoq_job_inflight", "The job's max_instances slots in use (queued or running)"),
                ("chronoq_job_buffered", "1 while a buffer_one fire waits for a slot"),
            )
        }
        outcomes = CounterMetricFamily("chronoq_job_fires", "Fires of the job by outcome", labels=["job", "outcome"])
        for n, spec in enumerate(labelled):
            if n % YIELD_EVERY == 0:
                time.sleep(0)  # let the event loop's thread have the GIL
            job = spec.id
            info.add_metric(
                [
                    job,
                    spec.task,
                    spec.kind,
                    describe_trigger(spec),
                    spec.timezone,
                    spec.queue,
                    spec.overlap,
                    spec.source,
                ],
                1,
            )
            counts = snap.job_counters.get(job, {})
            self._job_gauges(gauges, job, next_fires.get(job), snap, counts.get("last_success_ms"))
            gauges["chronoq_job_inflight"].add_metric([job], snap.inflight.get(job, 0))
            for outcome in FLEET_OUTCOMES:
                if outcome in counts:
                    outcomes.add_metric([job, outcome], counts[outcome])
        if others:
            self._other_gauges(gauges, others, next_fires, snap)
        yield info
        yield from gauges.values()
        yield outcomes
        yield GaugeMetricFamily(
            "chronoq_jobs_unlabelled", f'Jobs past HTTP_JOB_LABEL_LIMIT, summed up as job="{OTHER}"', value=len(others)
        )

    @staticmethod
    def _job_gauges(
        gauges: dict[str, GaugeMetricFamily],
        job: str,
        next_fire: datetime | None,
        snap: FleetSnapshot,
        last_success_ms: int | None,
    ) -> None:
        if next_fire is not None:
            gauges["chronoq_job_next_fire_timestamp_seconds"].add_metric([job], next_fire.timestamp())
        if job in snap.last_fire:
            gauges["chronoq_job_last_fire_timestamp_seconds"].add_metric([job], snap.last_fire[job])
        if last_success_ms is not None:
            gauges["chronoq_job_last_success_timestamp_seconds"].add_metric([job], last_success_ms / 1000)
        gauges["chronoq_job_paused"].add_metric([job], int(job in snap.paused))
        gauges["chronoq_job_buffered"].add_metric([job], int(job in snap.buffered))

    @staticmethod
    def _other_gauges(
        gauges: dict[str, GaugeMetricFamily],
        others: list[JobSpec],
        next_fires: dict[str, datetime | None],
        snap: FleetSnapshot,
    ) -> None:
        ids = [spec.id for spec in others]
        upcoming = [t for j in ids if (t := next_fires.get(j)) is not None]
        if upcoming:
            gauges["chronoq_job_next_fire_timestamp_seconds"].add_metric([OTHER], min(upcoming).timestamp())
        gauges["chronoq_job_paused"].add_metric([OTHER], sum(j in snap.paused for j in ids))
        gauges["chronoq_job_buffered"].add_metric([OTHER], sum(j in snap.buffered for j in ids))


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
