"""Every name two processes must agree on: message headers, task ids and the Redis key layout.

Queue names are settings (``CELERY_CRON_QUEUE``, ``CELERY_DEFAULT_QUEUE``); their defaults live
here. Every key chronoq itself writes starts with the configured prefix (``REDIS_KEY_PREFIX``,
default ``chronoq:``). The broker's lists and Celery's result keys keep Celery's own names, so a
plain Celery client can talk to a chronoq fleet and the other way round.
"""

from __future__ import annotations

import hashlib
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
_FIRE_NAMESPACE_BYTES = _FIRE_NAMESPACE.bytes


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
    return fire_task_id_of(job_id, format_scheduled_at(scheduled_at))


def fire_task_id_of(job_id: str, scheduled_at: str) -> str:
    """:func:`fire_task_id` from the formatted ``scheduled_at``: ``str(uuid.uuid5(...))``,
    spelled out because ``uuid.UUID`` costs more than the hash itself at thousands a second."""
    digest = bytearray(
        hashlib.sha1(_FIRE_NAMESPACE_BYTES + f"{job_id}|{scheduled_at}".encode(), usedforsecurity=False).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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

    # -- one fire -----------------------------------------------------------------------
    def fire(self, job_id: str, scheduled_at: str) -> str:
        """Hash: one fire's whole story, created atomically by whoever decides its outcome.

        Scheduler fields: ``outcome`` (dispatched | coalesced | skipped | missed | lost), ``reason``,
        ``task_id``, ``scheduled_at``, ``decided_ms``, ``dispatched_ms``, ``owner`` (replica),
        ``trigger`` (schedule | manual), and the dispatch audit's: ``audit`` (what it found last:
        queued, unacked, reindexed, republished), ``audit_ms``, ``republished`` (copies it
        published again). Worker fields: ``run`` (running | succeeded | failed |
        retried | expired), ``runner`` (host:pid of the attempt holding the lease),
        ``attempts``, ``run_retries`` (the running attempt's retry count), ``worker``,
        ``started_ms``, ``finished_ms``, ``duration_ms``, ``error``, ``run_lease_ms`` (epoch ms
        until which the running attempt holds the fire).
        """
        return self.key("fire", job_id, scheduled_at)

    def history(self, job_id: str) -> str:
        """List: the job's decided fires' ``scheduled_at``, newest first (in the order they were
        decided). Holds the last ``SCHEDULER_HISTORY_LIMIT``, plus older ones whose records are
        still needed to fence duplicates (see ``fence``)."""
        return self.key("history", job_id)

    @property
    def fence(self) -> str:
        """Hash: job id -> ``scheduled_at`` of its newest retired fire. A retired fire's hash is
        deleted; any fire of the job at or before this mark counts as decided."""
        return self.key("fence")

    @property
    def last_fire(self) -> str:
        """Hash: job id -> JSON of its last dispatched fire (scheduled_at, dispatched_at, task_id)."""
        return self.key("last_fire")

    @property
    def counters(self) -> str:
        """Hash: outcome -> count over every job (scheduler and worker outcomes)."""
        return self.key("counters")

    def job_counters(self, job_id: str) -> str:
        """Hash: outcome -> count for one job, and ``last_success_ms`` (epoch ms of its last success)."""
        return self.key("counters", "job", job_id)

    @property
    def dispatched(self) -> str:
        """Sorted set: fires dispatched whose run has not started, as ``job_id`` + ``\\x1f`` +
        ``scheduled_at`` -> epoch ms when the dispatch audit (:mod:`scheduler.audit`) is to look
        at them: their dispatch plus the visibility timeout and the audit's margin, or their
        message's expiry plus the margin if sooner; after a look, one such deadline later. Added to by whoever publishes a fire (decide, a released
        buffer, the audit's republish), removed from by the run's start, a report that it never
        started, and the audit once it has no more to check."""
        return self.key("dispatched")

    # -- the fleet-wide max_instances ----------------------------------------------------
    def inflight(self, job_id: str) -> str:
        """Sorted set: task ids of the job queued or running anywhere -> epoch ms when the slot
        lapses (a worker that died never gives it back)."""
        return self.key("inflight", job_id)

    def buffer(self, job_id: str) -> str:
        """Hash: the one fire of a ``buffer_one`` job waiting for a slot (task_id, scheduled_at,
        list, payload, lapse_ms, and when the dispatch audit is to look at it once dispatched:
        expiry_ms, audit_after_ms, audit_margin_ms)."""
        return self.key("buffer", job_id)

    @property
    def buffered(self) -> str:
        """Set: job ids that have a waiting fire."""
        return self.key("buffered")

    # -- replicas, operators -------------------------------------------------------------
    @property
    def leader(self) -> str:
        """String: the replica holding the leader lease (PX ttl)."""
        return self.key("leader")

    @property
    def replicas(self) -> str:
        """Hash: replica id -> JSON (host, pid, started_at, heartbeat_ms, role, jobs)."""
        return self.key("replicas")

    @property
    def workers(self) -> str:
        """Hash: worker hostname -> JSON (last_seen_ms, pid, queues, tasks)."""
        return self.key("workers")

    @property
    def poison(self) -> str:
        """List: messages workers could not read (JSON: queue, reason, size, sha256, seen_ms,
        raw_b64), newest first, bounded; counted as ``poison`` in :attr:`counters`."""
        return self.key("poison")

    @property
    def idle(self) -> str:
        """A key nothing writes: while Redis is at maxmemory, a worker waits for messages with a
        ``BLPOP`` on it (a server-side sleep; see workers/take.py)."""
        return self.key("idle")

    @property
    def jobs(self) -> str:
        """Hash: job id -> JSON of its spec, as the replicas last loaded it."""
        return self.key("jobs")

    @property
    def jobs_version(self) -> str:
        """String: a counter raised with every write of file and code jobs to ``jobs`` (a replica
        publishing its jobs, a removal); API job writes move the ``changes`` feed instead. Readers
        keep a snapshot of the job list until one of them moves (scheduler.joblist)."""
        return self.key("jobs_version")

    @property
    def paused(self) -> str:
        """Hash: job id -> JSON (at, note, by) for paused jobs."""
        return self.key("paused")

    @property
    def removed(self) -> str:
        """Hash: job id -> JSON (at, note, by, source, source_hash) for jobs removed at runtime."""
        return self.key("removed")

    @property
    def audit(self) -> str:
        """List: operator actions, JSON (at, action, job, note, by), newest first."""
        return self.key("audit")

    @property
    def control(self) -> str:
        """Pub/sub channel: operator changes, so replicas apply them at once."""
        return self.key("control")

    # -- jobs created at runtime (scheduler.jobstore) ----------------------------------------
    @property
    def api_jobs(self) -> str:
        """Hash: job id -> JSON record of a job created through the API (spec, version, source,
        incarnation, created/updated at, by, note). Written only by ``shared/lua/jobwrite.lua``."""
        return self.key("api_jobs")

    @property
    def changes(self) -> str:
        """Stream: one entry per API job change (op, job, version), trimmed to
        ``SCHEDULER_CHANGES_MAXLEN``; replicas follow it with XREAD BLOCK."""
        return self.key("changes")

    @property
    def invalid_jobs(self) -> str:
        """Hash: job id -> JSON (problem, replica, at_ms) of a stored API job a replica refused
        to run (shown by ``chronoq status``)."""
        return self.key("invalid_jobs")

    @property
    def fail_streak(self) -> str:
        """Hash: job id -> consecutive finally-failed fires (``pause_after_failures``)."""
        return self.key("fail_streak")

    def backfill(self, job_id: str) -> str:
        """List: JSON of the backfill fires of a ``sequential`` backfill still to dispatch,
        in nominal order (the next one is dispatched when the previous one finished)."""
        return self.key("backfill", job_id)

    @property
    def backfills(self) -> str:
        """Set: job ids with a sequential backfill in progress."""
        return self.key("backfills")

    @property
    def epoch(self) -> str:
        """String: JSON (id, losses, since) written by the first replica to start on an empty
        Redis; a replica that finds it gone knows Redis lost its data (scheduler.epoch)."""
        return self.key("epoch")

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key under the prefix."""
        return self.prefix + "*"
