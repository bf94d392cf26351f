"""What :meth:`scheduler.jobops.JobOps.list` searches: a snapshot of every job's listing fields
(:class:`JobIndex`), and every job's last outcome for the outcome filter.

A console serving 10,000 jobs must not read and parse them all for every search, and several
consoles must never disagree with Redis for long. So one snapshot is kept per process (per
:class:`scheduler.api.AsyncClient`), and every list first reads a fingerprint of the job
definitions in one round trip: the ``jobs_version`` counter (raised by every write of file and
code jobs), the newest entry of the ``changes`` feed (one per API job write) and the sizes of
``jobs`` and ``api_jobs``. The snapshot is re-read when the fingerprint moved, so a change made
through any chronoq process is in the next list of every console; a writer that raises neither
(an older replica during a rolling upgrade) is seen within :data:`SNAPSHOT_MAX_AGE_S`. Paused
flags are read fresh by every list.

Last outcomes change with every fire, so no counter can say when they moved: they are read for
every job at once (pipelined, :data:`OUTCOME_CHUNK` jobs a round trip) and reused for
:data:`OUTCOME_TTL_S`. The outcome filter sees outcomes at most that old; the rows it returns
show their current one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import redis.asyncio

from scheduler.jobstore import API, source_kind
from scheduler.views import NEVER_RUN, fire_view, last_outcome
from shared.names import RedisKeys

SNAPSHOT_MAX_AGE_S = 30.0
"""A snapshot is re-read after this long even when the fingerprint did not move."""
OUTCOME_TTL_S = 5.0
"""Every job's last outcome, for the outcome filter, is reused this long."""
OUTCOME_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Entry:
    """One job as the list filters it. ``raw``: its API record (``api``), else its registry entry."""

    id: str
    api: bool
    kind: str
    queue: str | None
    task_folded: str
    raw: str

    def matches(self, source: str | None, queue: str | None, needle: str) -> bool:
        if (source is not None and self.kind != source) or (queue is not None and self.queue != queue):
            return False
        return not needle or needle in self.id.casefold() or needle in self.task_folded


@dataclass(frozen=True, slots=True)
class Snapshot:
    entries: list[Entry]
    """Sorted by id."""
    fingerprint: tuple[Any, ...]
    loaded_at: float


def _entry(job_id: str, raw: str, api: bool) -> Entry:
    spec = json.loads(raw).get("spec") or {}
    kind = API if api else source_kind(str(spec.get("source", "code")))
    queue = spec.get("queue")
    return Entry(job_id, api, kind, None if queue is None else str(queue), str(spec.get("task", "")).casefold(), raw)


def _build(registry: dict[str, str], api_jobs: dict[str, str], previous: dict[str, Entry]) -> list[Entry]:
    """Entries of every job, sorted by id; unchanged ones are taken over without parsing."""
    entries = []
    for job_id in sorted(registry.keys() | api_jobs.keys()):
        api = job_id in api_jobs
        raw = api_jobs[job_id] if api else registry[job_id]
        old = previous.get(job_id)
        entries.append(old if old is not None and old.raw == raw and old.api == api else _entry(job_id, raw, api))
    return entries


class JobIndex:
    """The per-process snapshot of the job list and the last outcomes (see the module doc)."""

    def __init__(
        self,
        *,
        max_age_s: float = SNAPSHOT_MAX_AGE_S,
        outcome_ttl_s: float = OUTCOME_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.outcome_ttl_s = outcome_ttl_s
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._outcomes: tuple[float, dict[str, str]] | None = None
        self._lock = asyncio.Lock()
        self._outcome_lock = asyncio.Lock()
        self.loads = 0
        """How often the snapshot was (re-)read: a test's and a benchmark's witness."""

    @staticmethod
    def _fingerprint_commands(pipe: Any, keys: RedisKeys) -> None:
        pipe.get(keys.jobs_version)
        pipe.xrevrange(keys.changes, "+", "-", count=1)
        pipe.hlen(keys.jobs)
        pipe.hlen(keys.api_jobs)

    @staticmethod
    def _fingerprint(replies: Sequence[Any]) -> tuple[Any, ...]:
        newest = replies[1][0][0] if replies[1] else None
        return replies[0], newest, replies[2], replies[3]

    async def fingerprint(self, client: redis.asyncio.Redis, keys: RedisKeys) -> tuple[Any, ...]:
        """What moves with every write of a job definition (one round trip): a reader of the
        whole registry (the console's timeline) keeps what it computed while this is unchanged."""
        async with client.pipeline(transaction=False) as pipe:
            self._fingerprint_commands(pipe, keys)
            return self._fingerprint(await pipe.execute())

    async def snapshot(self, client: redis.asyncio.Redis, keys: RedisKeys) -> Snapshot:
        """The job list as Redis holds it now (re-read only when it moved)."""
        async with self._lock:  # one reload for all the requests that found it stale
            current = self._snapshot
            fresh = current is not None and self._clock() - current.loaded_at < self.max_age_s
            if current is not None and fresh and await self.fingerprint(client, keys) == current.fingerprint:
                return current
            started = self._clock()
            async with client.pipeline(transaction=True) as pipe:  # the fingerprint of exactly what is read
                self._fingerprint_commands(pipe, keys)
                pipe.hgetall(keys.jobs)
                pipe.hgetall(keys.api_jobs)
                replies = await pipe.execute()
            registry = {str(k): str(v) for k, v in replies[4].items()}
            api_jobs = {str(k): str(v) for k, v in replies[5].items()}
            previous = {entry.id: entry for entry in current.entries} if current is not None else {}
            entries = await anyio.to_thread.run_sync(_build, registry, api_jobs, previous)
            self._snapshot = Snapshot(entries, self._fingerprint(replies), started)
            self.loads += 1
            return self._snapshot

    async def last_outcomes(self, client: redis.asyncio.Redis, keys: RedisKeys, ids: Sequence[str]) -> dict[str, str]:
        """Each job's last outcome (:data:`OUTCOMES`), read for all of ``ids`` at most every
        :data:`OUTCOME_TTL_S`."""
        async with self._outcome_lock:
            cached = self._outcomes
            if cached is not None and self._clock() - cached[0] < self.outcome_ttl_s and cached[1].keys() >= set(ids):
                return cached[1]
            started, found = self._clock(), dict[str, str]()
            for first in range(0, len(ids), OUTCOME_CHUNK):
                chunk = ids[first : first + OUTCOME_CHUNK]
                async with client.pipeline(transaction=False) as pipe:
                    for job_id in chunk:
                        pipe.lindex(keys.history(job_id), 0)
                    latest = await pipe.execute()
                fired = [(job_id, str(stamp)) for job_id, stamp in zip(chunk, latest, strict=True) if stamp is not None]
                async with client.pipeline(transaction=False) as pipe:
                    for job_id, stamp in fired:
                        pipe.hmget(keys.fire(job_id, stamp), "run", "outcome")
                    states = await pipe.execute()
                found |= dict.fromkeys(chunk, NEVER_RUN)
                for (job_id, _), (run, outcome) in zip(fired, states, strict=True):
                    view = fire_view({k: str(v) for k, v in (("run", run), ("outcome", outcome)) if v is not None})
                    found[job_id] = last_outcome(view["final"])
            self._outcomes = (started, found)
            return found
