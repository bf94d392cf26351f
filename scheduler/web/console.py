"""What the API and the pages share: one Redis client and Celery app per console (created on
first use, in the serving event loop, so a mounted console needs no lifespan hook), the
operations of a request's user, and how chronoq's errors become HTTP statuses."""

from __future__ import annotations

import asyncio
import bisect
import json
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import anyio
import redis

from scheduler.api import AsyncClient
from scheduler.jobops import JobOps
from scheduler.operator import Operator
from scheduler.specs import STORED, JobSpec
from scheduler.triggers import next_fire_times
from shared.errors import (
    BackfillLimitError,
    ChronoqError,
    ConfigError,
    OwnershipError,
    RedisUnavailableError,
    UnknownJobError,
    VersionConflictError,
)
from shared.redaction import redact_text
from shared.settings import AppSettings

TIMELINE_TTL_S = 10.0
"""A timeline is computed at most this often (10,000 jobs take a second or more of CPU)."""
TIMELINE_SLACK_S = 600.0
"""A timeline is computed this far beyond its end, and reused until that runs out, as long as
no job changed (the job list's fingerprint and the paused jobs): every open tab, for minutes."""
LIVE_TTL_S = 2.0
"""Live regions (htmx polls) of every open tab share what was read for them this long."""
LIVE_MAX_KEYS = 500
TIMELINE_MAX_FIRES = 2000
"""Per job and per page: the timeline lists at most this many fires (its chart counts all)."""
PARSE_THREADS = 2
"""User documents (form fields, API bodies) are parsed in at most this many worker threads at
once per console; more posts wait their turn while the event loop goes on answering."""


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timeline:
    """A computed timeline: when, up to when, for which state of the jobs, its fires."""

    at: datetime
    end: datetime
    moved: tuple[Any, ...]
    fires: list[dict[str, Any]]
    stamps: list[float]
    """Each fire's epoch seconds (the fires are sorted by time)."""


class Console:
    """The state of one console app: settings and a lazily created client."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._client: AsyncClient | None = None
        self._lock = asyncio.Lock()
        self.specs = SpecCache()
        self._timelines: dict[float, Timeline] = {}
        self.timeline_computations = 0
        self._timeline_lock = asyncio.Lock()
        self._live: dict[Hashable, tuple[float, Any]] = {}
        self._live_locks: dict[Hashable, asyncio.Lock] = {}
        self.live_reads = 0
        """How often a live region's data was read from Redis (not taken from the cache)."""
        self._parse_limiter: anyio.CapacityLimiter | None = None

    async def parse(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker thread, at most :data:`PARSE_THREADS` at once: a
        user's document is parsed (and a form read into a spec) off the event loop, so a big
        one never stalls the other requests (``/healthz`` included)."""
        if self._parse_limiter is None:  # created in the serving event loop
            self._parse_limiter = anyio.CapacityLimiter(PARSE_THREADS)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._parse_limiter)

    async def client(self) -> AsyncClient:
        async with self._lock:
            if self._client is None:
                self._client = AsyncClient(self.settings, by="web")
            return self._client

    async def ops(self, by: str) -> JobOps:
        """The one operations layer (as the CLI and the Python client), recorded as ``by``."""
        return (await self.client()).ops_as(by)

    async def operator(self) -> Operator:
        return (await self.client()).ops.operator

    async def timeline(self, minutes: float) -> tuple[datetime, list[dict[str, Any]], Sequence[float]]:
        """:func:`upcoming` as of now, and each fire's epoch seconds. Computed
        :data:`TIMELINE_SLACK_S` beyond its end and reused (the fires already past cut off by
        bisection) until that runs out or a job changed; a change is in it within
        :data:`TIMELINE_TTL_S` (it is computed at most that often)."""
        async with self._timeline_lock:
            now = datetime.now(UTC)
            client, operator = await self.client(), await self.operator()
            moved = (
                await client.index.fingerprint(client.redis, operator.keys),
                frozenset(await operator.control.paused()),
            )
            cached = self._timelines.get(minutes)
            stale = (
                cached is None
                or now + timedelta(minutes=minutes) > cached.end
                or (cached.moved != moved and (now - cached.at).total_seconds() > TIMELINE_TTL_S)
            )
            if cached is None or stale:
                horizon = minutes + TIMELINE_SLACK_S / 60
                fires = await upcoming(operator, horizon, now, cache=self.specs)
                stamps = [datetime.fromisoformat(fire["at"]).timestamp() for fire in fires]
                cached = Timeline(now, now + timedelta(minutes=horizon), moved, fires, stamps)
                self._timelines[minutes] = cached
                self.timeline_computations += 1
        first = bisect.bisect_right(cached.stamps, now.timestamp())
        last = bisect.bisect_right(cached.stamps, now.timestamp() + minutes * 60)
        return now, cached.fires[first:last], cached.stamps[first:last]

    async def live(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``'s answer, shared by every poll of ``key`` for :data:`LIVE_TTL_S`: twenty
        open tabs cost about what one does. A change made through this console drops them all
        (:meth:`changed`); one made elsewhere shows within the TTL. Errors are not kept."""
        lock = self._live_locks.setdefault(key, asyncio.Lock())
        async with lock:  # the tabs polling together wait for one read
            found = self._live.get(key)
            now = time.monotonic()
            if found is not None and now - found[0] < LIVE_TTL_S:
                return cast(T, found[1])
            value = await read()
            self.live_reads += 1
            if len(self._live) > LIVE_MAX_KEYS:  # searches typed in many tabs: keep it bounded
                self._live.clear()
                self._live_locks = {key: lock}
            self._live[key] = (now, value)
            return value

    def changed(self) -> None:
        """Something was changed through this console: live regions read afresh."""
        self._live.clear()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def error_status(exc: BaseException) -> tuple[int, list[str]] | None:
    """The HTTP status and message lines of an error an operation raised, or None when it is
    not one of chronoq's (a bug: 500). Ownership is 409: the request conflicts with who owns
    the job (403 means the caller may not act at all)."""
    if isinstance(exc, ConfigError):  # JobSpecError too: one line per problem naming job and field
        return 422, exc.problems
    if isinstance(exc, UnknownJobError):
        return 404, [str(exc)]
    if isinstance(exc, VersionConflictError | OwnershipError):
        return 409, [str(exc)]
    if isinstance(exc, BackfillLimitError):
        return 422, [str(exc)]
    if isinstance(exc, RedisUnavailableError):
        return 503, [redact_text(str(exc))]
    if isinstance(exc, redis.RedisError | ConnectionError | TimeoutError):
        return 503, [redact_text(f"redis unavailable: {exc}")]
    if isinstance(exc, ChronoqError):
        return 400, [str(exc)]
    return None


async def upcoming(
    operator: Operator, minutes: float, now: datetime | None = None, cache: SpecCache | None = None
) -> list[dict[str, Any]]:
    """Every registered job's fires of the next ``minutes`` (paused and disabled jobs left out:
    they would not run), sorted by time, at most :data:`TIMELINE_MAX_FIRES` per job. The trigger
    math runs in a worker thread (10,000 jobs take a while; the console keeps answering), on
    specs validated once per registry entry when ``cache`` is given."""
    now = now or datetime.now(UTC)
    registry = await operator.client.hgetall(operator.keys.jobs)
    paused = await operator.control.paused()
    cache = cache if cache is not None else SpecCache()
    entries = {str(k): str(v) for k, v in registry.items() if k not in paused}
    return await anyio.to_thread.run_sync(cache.upcoming, entries, now, now + timedelta(minutes=minutes))


class SpecCache:
    """Registry entries already validated, by their JSON: a refresh validates only changed jobs."""

    def __init__(self) -> None:
        self._specs: dict[str, tuple[str, JobSpec]] = {}
        self._lock = threading.Lock()

    def upcoming(self, entries: dict[str, str], now: datetime, end: datetime) -> list[dict[str, Any]]:
        with self._lock:
            fires: list[dict[str, Any]] = []
            for job_id, raw in entries.items():
                known = self._specs.get(job_id)
                if known is None or known[0] != raw:
                    known = (raw, JobSpec.model_validate(json.loads(raw)["spec"], context=STORED))
                    self._specs[job_id] = known
                spec = known[1]
                if spec.enabled:
                    fires += [{"at": t.astimezone(UTC).isoformat(), "job": job_id, "task": spec.task}
                              for t in _fires_between(spec, now, end)]  # fmt: skip
            for gone in self._specs.keys() - entries.keys():
                del self._specs[gone]
        fires.sort(key=lambda f: (f["at"], f["job"]))
        return fires


def _fires_between(spec: JobSpec, now: datetime, end: datetime) -> list[datetime]:
    """Fire times in (now, end], asked for in growing batches: a daily job costs one."""
    found: list[datetime] = []
    after, size = now, 2
    while len(found) < TIMELINE_MAX_FIRES:
        batch = next_fire_times(spec, after, size)
        inside = [t for t in batch if t <= end]
        found += inside
        if len(inside) < size:
            break
        after, size = batch[-1], min(size * 4, 256)
    return found[:TIMELINE_MAX_FIRES]


def histogram(stamps: Sequence[float], now: datetime, minutes: float, buckets: int = 60) -> list[int]:
    """Fires per bucket of ``minutes / buckets`` from ``now`` (the timeline's bar chart), from
    their sorted epoch seconds: two bisections a bucket, however many fires."""
    start, width = now.timestamp(), minutes * 60 / buckets
    edges = [bisect.bisect_left(stamps, start + width * i) for i in range(buckets + 1)]
    return [edges[i + 1] - edges[i] for i in range(buckets)]
