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
stays bounded; only labelled jobs' series are read from Redis, by ``jobstats.lua`` in batches
(one reply per few hundred jobs instead of two commands per job). A plain ``collect`` yields them
as ``prometheus_client`` families; the ``/metrics`` page instead asks :meth:`job_text` for the
same bytes, formatted again only where a value changed (:mod:`scheduler.jobseries`).

Runs in the metrics server process (:mod:`scheduler.metricsd`), in its HTTP threads, with its
own blocking client. The jobs are :class:`JobRow` there (the labels the scheduler wrote, see
:mod:`scheduler.replicastate`) and the next fire times epoch seconds; tests also hand it
``JobSpec`` objects and datetimes directly. It still lets go of the GIL between pieces of work
(which mattered when it ran in the scheduler's own process).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import redis
from loguru import logger
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.fleetfamilies import FLEET_OUTCOMES, FleetSnapshot, fleet_families
from scheduler.jobseries import CHUNK, FIRES, GAUGES, OTHER, JobColumns, JobSeriesText, job_families, offer_gil
from scheduler.replicastate import JobRow
from scheduler.specs import JobSpec
from scheduler.triggers import describe_trigger
from shared import lua
from shared.names import RedisKeys

__all__ = ["OTHER", "FleetCollector", "FleetSnapshot", "JobRow"]

Job = JobSpec | JobRow
"""A job as the collector sees it: the spec itself, or the metrics server's row of it."""

STATS_BATCH = 500
"""Jobs per call of ``jobstats.lua``: each call holds Redis about a millisecond."""
NEXT, LAST, SUCCESS, PAUSED, INFLIGHT, BUFFERED = (name for name, _ in GAUGES)


class FleetCollector(Collector):
    """A ``prometheus_client`` collector over Redis and the replica's job list.

    ``queue_keys`` gives the broker lists of a queue; ``queues`` the queues always reported
    (the configured ones); the queues of the current jobs (runtime jobs on a new queue too)
    are added, up to ``queue_limit`` queues with a label, the rest summed up as
    ``queue="_other"``.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        *,
        jobs: Callable[[], Sequence[Job]],
        next_fires: Callable[[], Mapping[str, datetime | float | None]],
        queue_keys: Callable[[str], list[str]],
        queues: Sequence[str] = (),
        label_limit: int,
        cache_s: float,
        queue_limit: int = 100,
    ) -> None:
        self.client = client
        self.keys = keys
        self.jobs = jobs
        self.next_fires = next_fires
        self.queue_keys = queue_keys
        self.base_queues = list(dict.fromkeys(queues))
        self.label_limit = label_limit
        self.queue_limit = queue_limit
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._snapshot: FleetSnapshot | None = None
        self._failed_at = -float("inf")
        self._labelled: tuple[int, list[Job]] = (-1, [])
        self._info: dict[str, tuple[Job, tuple[str, ...]]] = {}
        self._snap_cols: tuple[FleetSnapshot | None, list[str] | None, dict[str, list[Any]]] = (None, None, {})
        self._info_of: tuple[list[Job] | None, tuple[list[str], list[tuple[str, ...]]]] = (None, ([], []))
        self._last_fire_raw: dict[str, tuple[str, float]] = {}
        self._counters_raw: dict[str, tuple[str, int, tuple[tuple[str, int], ...], float | None]] = {}
        self._stats_batches: tuple[list[str] | None, list[list[str]]] = (None, [])
        self._queue_keys: dict[str, list[str]] = {}
        self._pinned = threading.local()
        self._stats = client.register_script(lua.source("jobstats"))
        self.text = JobSeriesText()
        self.reads = 0
        """Times Redis was read (tests and the benchmark count them)."""

    # -- reading Redis, at most once per cache_s ------------------------------------------------

    def snapshot(self) -> FleetSnapshot | None:
        """The fleet data, from cache if fresh; None while Redis does not answer. Within
        :meth:`scrape`, the one the scrape started with."""
        pinned = getattr(self._pinned, "scrape", None)
        if pinned is not None:
            return pinned[0]  # type: ignore[no-any-return]
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

    @contextmanager
    def scrape(self) -> Iterator[FleetSnapshot | None]:
        """One scrape by the ``/metrics`` page: every family sees the same snapshot, and
        :meth:`collect` leaves the per-job families to :meth:`job_text`."""
        snap = self.snapshot()
        self._pinned.scrape = (snap,)
        try:
            yield snap
        finally:
            self._pinned.scrape = None

    def _queues(self) -> dict[str, list[str]]:
        """Queue name -> broker lists: the configured queues, then the jobs' by name."""
        names = dict.fromkeys(self.base_queues)
        names.update(dict.fromkeys(sorted({spec.queue for spec in self.jobs()} - set(names))))
        keys = {}
        for name in names:
            if name not in self._queue_keys:
                try:
                    self._queue_keys[name] = self.queue_keys(name)
                except (ValueError, KeyError) as exc:  # a queue the encoder cannot route
                    logger.warning("metrics: no length for queue {}: {}", name, exc)
                    self._queue_keys[name] = []
            keys[name] = self._queue_keys[name]
        if len(self._queue_keys) > 2 * len(names):  # forget queues no job uses any more
            self._queue_keys = {name: self._queue_keys[name] for name in names}
        return keys

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
        queue_keys = self._queues()
        for keys in queue_keys.values():
            for key in keys:
                pipe.llen(key)
        replies = pipe.execute()
        counters, leader, replicas, workers, paused, buffered = replies[:6]
        at = 6
        queues: dict[str, int] = {}
        for n, (name, keys) in enumerate(queue_keys.items()):
            length = sum(int(x) for x in replies[at : at + len(keys)])
            at += len(keys)
            label = name if n < self.queue_limit else OTHER
            queues[label] = queues.get(label, 0) + length
        # The labelled jobs' part, one round trip per batch: the loop's thread gets the GIL
        # while each is on the wire, and no send or reply is thousands of items long.
        ids = [spec.id for spec in self.labelled_jobs()]
        last_fires: list[str | None] = []
        stats: list[str] = []
        for start, batch in zip(range(0, len(ids), STATS_BATCH), self._stats_keys(ids), strict=True):
            last_fires += self.client.hmget(k.last_fire, ids[start : start + STATS_BATCH])  # type: ignore[arg-type]
            stats += self._stats(keys=batch)
        snap = FleetSnapshot(
            read_at=now,
            counters={str(o): int(c) for o, c in counters.items()},
            leader=str(leader) if leader else None,
            replicas={str(r): json.loads(v) for r, v in replicas.items()},
            workers={str(w): json.loads(v) for w, v in workers.items()},
            queues=queues,
            paused={str(j) for j in paused},
            buffered={str(j) for j in buffered},
            last_fire=self._last_fires(ids, last_fires),
        )
        self._job_stats(snap, ids, iter(stats))
        return snap

    def _stats_keys(self, ids: list[str]) -> list[list[str]]:
        """The KEYS of each ``jobstats.lua`` call for ``ids`` (built again when they change)."""
        if self._stats_batches[0] != ids:
            k, batches = self.keys, []
            for at in range(0, len(ids), STATS_BATCH):
                batches.append(
                    [key for job in ids[at : at + STATS_BATCH] for key in (k.job_counters(job), k.inflight(job))]
                )
            self._stats_batches = (ids, batches)
        return self._stats_batches[1]

    def _job_stats(self, snap: FleetSnapshot, ids: list[str], stats: Iterator[str]) -> None:
        """Each job's counters and slots into ``snap``; a job whose ``jobstats.lua`` line is
        unchanged since the last read is not parsed again (most are, between two reads)."""
        known, seen = self._counters_raw, {}
        fires, success, inflight = snap.job_fires, snap.last_success, snap.inflight
        for n, (job, raw) in enumerate(zip(ids, stats, strict=True)):
            entry = known.get(job)
            if entry is None or entry[0] != raw:
                parts = raw.split()
                counts = dict(zip(parts[1::2], parts[2::2], strict=True))
                ms = counts.get("last_success_ms")
                outcomes = tuple((o, int(counts[o])) for o in FLEET_OUTCOMES if o in counts)
                entry = (raw, int(parts[0]), outcomes, None if ms is None else int(ms) / 1000)
            seen[job] = entry
            inflight[job], fires[job] = entry[1], entry[2]
            if entry[3] is not None:
                success[job] = entry[3]
            if n % CHUNK == CHUNK - 1:
                offer_gil()
        self._counters_raw = seen  # the labelled jobs only

    def _last_fires(self, ids: list[str], raws: list[str | None]) -> dict[str, float]:
        """Each job's last fire record parsed to its nominal time, parsing only records that
        changed since the last read (a JSON document and an ISO time each)."""
        seen, parsed = self._last_fire_raw, {}
        for n, (job, raw) in enumerate(zip(ids, raws, strict=True)):
            if n % CHUNK == CHUNK - 1:
                offer_gil()
            if raw is None:
                continue
            known = seen.get(job)
            parsed[job] = (
                raw,
                known[1] if known is not None and known[0] == raw else _epoch(json.loads(raw)["scheduled_at"]),
            )
        self._last_fire_raw = parsed
        return {job: epoch for job, (_, epoch) in parsed.items()}

    def labelled_jobs(self) -> list[Job]:
        """The first ``label_limit`` jobs by id (recomputed only when the job list changes)."""
        jobs = self.jobs()
        key = hash(tuple(id(spec) for spec in jobs)) if len(jobs) <= 100_000 else len(jobs)
        if self._labelled[0] != key:
            self._labelled = (key, sorted(jobs, key=lambda s: s.id)[: self.label_limit])
        return self._labelled[1]

    def cached_jobs(self) -> int:
        """The most jobs any per-job cache holds (never more than the labelled jobs)."""
        sizes = (len(self._info), len(self._counters_raw), len(self._last_fire_raw), self.text.cached_jobs())
        return max(*sizes, len(self._info_of[1][0]))

    # -- exposition ------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield family
            offer_gil()  # between families (each is formatted in one go): the loop's turn

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
        yield from fleet_families(snap, time.time())
        if getattr(self._pinned, "scrape", None) is None:  # a plain collect: the reference families
            yield from job_families(self.job_columns(snap, jobs))

    def job_text(self, snap: FleetSnapshot | None, encoder: Any, names: set[str] | None = None) -> list[str]:
        """The per-job families as ``encoder`` writes them, in pieces (see :class:`JobSeriesText`)."""
        if snap is None:
            return []
        return self.text.pieces(self.job_columns(snap, self.jobs()), encoder, names)

    def job_columns(self, snap: FleetSnapshot, jobs: Sequence[Job]) -> JobColumns:
        """The per-job values of ``snap``, labelled jobs first, the rest summed up."""
        labelled = self.labelled_jobs()
        ids, info = self._info_labels(labelled)
        next_fires = self.next_fires()
        paused, buffered = snap.paused, snap.buffered
        columns = JobColumns(info=info, gauges={NEXT: []}, ids=ids)
        for start in range(0, len(ids), CHUNK):
            part = ids[start : start + CHUNK]
            columns.gauges[NEXT] += [_stamp(next_fires.get(job)) for job in part]
            offer_gil()
        columns.gauges.update(self._snap_columns(snap, ids))
        columns.fires = columns.gauges.pop(FIRES)  # type: ignore[assignment]
        if len(jobs) > len(labelled):
            named = set(ids)
            others = [spec.id for spec in jobs if spec.id not in named]
            upcoming = [t for j in others if (t := next_fires.get(j)) is not None]
            columns.unlabelled = len(others)
            columns.other_next_fire = _stamp(min(upcoming)) if upcoming else None  # type: ignore[type-var]
            columns.other_paused = sum(j in paused for j in others)
            columns.other_buffered = sum(j in buffered for j in others)
        return columns

    def _snap_columns(self, snap: FleetSnapshot, ids: list[str]) -> dict[str, list[Any]]:
        """The columns that come from Redis: the same lists for as long as the same snapshot
        serves (``HTTP_FLEET_CACHE_S``) and the same jobs, so the text needs no comparing."""
        if self._snap_cols[0] is snap and self._snap_cols[1] is ids:
            return dict(self._snap_cols[2])
        last_fire, paused, buffered, inflight = snap.last_fire, snap.paused, snap.buffered, snap.inflight
        success, job_fires = snap.last_success, snap.job_fires
        cols: dict[str, list[Any]] = {name: [] for name in (LAST, SUCCESS, PAUSED, INFLIGHT, BUFFERED, FIRES)}
        for start in range(0, len(ids), CHUNK):
            part = ids[start : start + CHUNK]
            cols[LAST] += [last_fire.get(job) for job in part]
            cols[SUCCESS] += [success.get(job) for job in part]
            cols[PAUSED] += [int(job in paused) for job in part]
            cols[INFLIGHT] += [inflight.get(job, 0) for job in part]
            cols[BUFFERED] += [int(job in buffered) for job in part]
            cols[FIRES] += [job_fires.get(job, ()) for job in part]
            offer_gil()
        self._snap_cols = (snap, ids, cols)
        return dict(cols)

    def _info_labels(self, labelled: list[Job]) -> tuple[list[str], list[tuple[str, ...]]]:
        """The labelled jobs' ids and info labels, worked out again only for new or changed
        specs (and not at all while the job list is the same)."""
        if self._info_of[0] is labelled:
            return self._info_of[1]
        known, info = self._info, {}
        for n, spec in enumerate(labelled):
            if n % CHUNK == CHUNK - 1:
                offer_gil()
            entry = known.get(spec.id)
            if entry is None or entry[0] is not spec:
                entry = (spec, tuple(spec) if isinstance(spec, JobRow) else job_row(spec))
            info[spec.id] = entry
        self._info = info  # only the labelled jobs: deleted ones are dropped
        self._info_of = (labelled, (list(info), [entry[1] for entry in info.values()]))
        return self._info_of[1]


def job_row(spec: JobSpec) -> JobRow:
    """A job's ``chronoq_job_info`` labels (what the scheduler hands its metrics server)."""
    labels = (
        spec.id, spec.task, spec.kind, describe_trigger(spec),
        spec.timezone, spec.queue, spec.overlap, spec.source,
    )  # fmt: skip
    return JobRow(*(str(v) for v in labels))


def _stamp(at: datetime | float | None) -> float | None:
    return at if at is None or isinstance(at, float) else at.timestamp()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
