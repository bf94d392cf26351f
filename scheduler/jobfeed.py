"""A replica's side of the API jobs: load them at start, follow the change feed, resync after a gap.

- **Start**: the feed's position is read first, then every record (``api_jobs``), so a change
  written meanwhile is replayed from the feed, never lost. Each record is validated again; an
  invalid one is logged, listed in ``invalid_jobs`` (shown by ``chronoq status``) and not run.
- **Follow**: ``XREAD BLOCK`` on the ``changes`` stream; each entry names a job and its
  version, and the replica applies the stored record (newer than the one it runs) at once:
  within a second of the write on every replica. Unchanged jobs are not touched, so they keep
  their grid and catch-up state.
- **Gap**: when entries newer than the last one seen were trimmed (a replica that fell more
  than ``SCHEDULER_CHANGES_MAXLEN`` behind), or Redis lost its data (scheduler.epoch), the
  replica resyncs: every record again, applying only the difference.
- **Sequential backfills** (leader only): the next queued fire of a ``backfill --overlap
  sequential`` goes out once the previous one finished.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

import redis
import redis.asyncio
from loguru import logger

from scheduler.events import SentEvents, announce
from scheduler.fires import BACKFILL, Fire, Limits
from scheduler.jobops import Encode, backfill_intent
from scheduler.jobstore import API, JobStore, parse_record
from scheduler.manager import SchedulerManager
from scheduler.planner import id_conflicts
from scheduler.specs import JobSpec
from shared.errors import JobSpecError
from shared.fleet import FireLedger
from shared.names import RedisKeys
from shared.redis import raise_if_cancelling
from shared.settings import AppSettings

BLOCK_MS = 1000
SWEEP_S = 0.5
FINISHED = ("succeeded", "failed", "expired")


class JobFeed:
    """Keeps one replica's API jobs equal to what Redis stores."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: RedisKeys,
        manager: SchedulerManager,
        owner: str,
        settings: AppSettings,
        *,
        ledger: FireLedger,
        encode: Encode,
        is_leader: Callable[[], bool],
        on_change: Callable[[], None] = lambda: None,
        events: SentEvents | None = None,
    ) -> None:
        self.client, self.keys, self.manager, self.owner = client, keys, manager, owner
        self.events = events
        """Announces a sequential backfill's fires (task-sent) when events are enabled."""
        self.store = JobStore(client, keys, changes_maxlen=settings.scheduler.changes_maxlen)
        self.limits = Limits.from_settings(settings)
        self.ledger, self.encode, self.is_leader, self.on_change = ledger, encode, is_leader, on_change
        self.last_id = "0-0"
        self.versions: dict[str, int] = {}
        """Job id -> the stored version this replica runs (or refused as invalid)."""
        self.owners: dict[str, str] = {}
        """API job id -> who created it and when (named when a job file uses the same id)."""
        self.resync_needed = False
        self.invalid: set[str] = set()
        """Ids listed in ``invalid_jobs`` (as read at the last load or resync, plus own reports)."""

    async def load(self) -> list[JobSpec]:
        """At start: the valid stored API jobs (to register before the manager starts)."""
        started = time.perf_counter()
        self.last_id = await self.store.position()
        self.invalid = {str(job_id) for job_id in await self.client.hkeys(self.keys.invalid_jobs)}
        specs = []
        gc.disable()  # 100,000 records make 100,000s of objects: no collections while they come
        try:
            for raw in await self.store.all_values():
                spec = await self._parse(_id_of(raw), raw)
                if spec is not None:
                    specs.append(spec)
        finally:
            gc.enable()
        elapsed = time.perf_counter() - started
        logger.info("loaded {} API jobs in {:.2f}s (change feed at {})", len(specs), elapsed, self.last_id)
        return specs

    def admit(self, specs: list[JobSpec]) -> list[JobSpec]:
        """File and code jobs, without those whose id an API job uses (logged, naming both)."""
        kept, problems = id_conflicts(specs, self.owners)
        for line in problems:
            logger.error("job refused: {}", line)
        return kept

    async def resync(self) -> None:
        """Make the running API jobs equal the stored ones (after a gap or a data loss)."""
        self.last_id = await self.store.position()
        self.invalid = {str(job_id) for job_id in await self.client.hkeys(self.keys.invalid_jobs)}
        stored = {_id_of(raw): raw for raw in await self.store.all_values()}
        for spec in self.manager.list():
            if spec.source == API and spec.id not in stored:
                self._remove(spec.id)
        gc.disable()
        try:
            for job_id, raw in stored.items():
                await self._apply(job_id, raw)
        finally:
            gc.enable()
        self.resync_needed = False
        self.on_change()
        logger.info("API jobs resynced: {} stored (change feed at {})", len(stored), self.last_id)

    async def follow(self) -> None:
        """Apply changes from the feed until cancelled; Redis errors are retried."""
        while True:
            raise_if_cancelling()
            try:
                if self.resync_needed or await self.store.trimmed_past(self.last_id):
                    if not self.resync_needed:
                        logger.warning("change feed trimmed past {}: resyncing every API job", self.last_id)
                    await self.resync()
                for entry_id, fields in await self.store.read(self.last_id, BLOCK_MS):
                    job_id = fields.get("job", "")
                    if fields.get("op") == "delete":
                        self._remove(job_id)
                    elif int(fields.get("version", 0)) != self.versions.get(job_id):
                        await self._apply(job_id, await self.store.raw(job_id))
                    self.last_id = entry_id
                self.on_change()
            except (redis.RedisError, OSError) as exc:
                raise_if_cancelling()
                logger.warning("reading the change feed failed: {}; retrying", exc)
                await asyncio.sleep(0.5)

    async def _parse(self, job_id: str, raw: str) -> JobSpec | None:
        """The stored record's spec, or None after reporting it invalid."""
        try:
            record, spec = parse_record(raw)
        except JobSpecError as exc:
            await self._report_invalid(job_id, raw, str(exc).replace("\n", "; "))
            return None
        self.versions[job_id] = version = int(record["version"])
        self.owners[job_id] = f"created by {record.get('created_by')} at {record.get('created_at')}"
        if job_id in self.invalid:  # listed as invalid: one HDEL, not one per job
            self.invalid.discard(job_id)
            await self.client.hdel(self.keys.invalid_jobs, job_id)
            logger.bind(job_id=job_id).info("stored API job is valid again (version {})", version)
        return spec

    async def _report_invalid(self, job_id: str, raw: str, problem: str) -> None:
        version = _version_of(raw)
        if self.versions.get(job_id) != -version:
            logger.bind(job_id=job_id).error("stored API job refused, not run: {}", problem)
        self.versions[job_id] = -version  # reported once per version
        entry = {"problem": problem, "replica": self.owner, "at_ms": int(time.time() * 1000), "version": version}
        await self.client.hset(self.keys.invalid_jobs, job_id, json.dumps(entry))
        self.invalid.add(job_id)

    async def _apply(self, job_id: str, raw: str | None) -> None:
        if raw is None:
            self._remove(job_id)
            return
        spec = await self._parse(job_id, raw)
        if spec is None:
            self._remove(job_id)
            return
        if not self.manager.has(job_id):
            self.manager.forget_last_fire(job_id)  # a new job: no catch-up from an earlier one's fires
            self.manager.register(spec)
            logger.bind(job_id=job_id).info("API job created (version {})", self.versions[job_id])
            return
        current = self.manager.get(job_id)
        if current.source != API:
            # A reload that raced the create (it read the file before this replica saw the API
            # job): the stored API job wins here too, as on every replica that saw it first.
            self.manager.replace(spec)
            logger.bind(job_id=job_id).error(
                "{}: job {!r} refused: id is already used by an API job (version {}); the API job runs",
                current.source,
                job_id,
                self.versions[job_id],
            )
        elif current != spec:
            self.manager.replace(spec)
            logger.bind(job_id=job_id).info("API job updated (version {})", self.versions[job_id])

    def _remove(self, job_id: str) -> None:
        self.versions.pop(job_id, None)
        self.owners.pop(job_id, None)
        if self.manager.has(job_id) and self.manager.get(job_id).source == API:
            self.manager.remove(job_id)
            self.manager.forget_last_fire(job_id)

    async def sweep_backfills(self) -> None:
        """Leader only: dispatch the next fire of each sequential backfill whose previous
        fire finished (or is gone); a deleted job's queue is dropped."""
        while True:
            raise_if_cancelling()
            await asyncio.sleep(SWEEP_S)
            if not self.is_leader():
                continue
            try:
                for job_id in sorted(str(j) for j in await self.client.smembers(self.keys.backfills)):
                    await self._next_backfill(job_id)
            except (redis.RedisError, OSError) as exc:
                raise_if_cancelling()
                logger.warning("backfill sweep: {}", exc)

    async def _next_backfill(self, job_id: str) -> None:
        queue = self.keys.backfill(job_id)
        head = await self.client.lindex(queue, 0)
        if head is None or not self.manager.has(job_id):
            await self.client.delete(queue)
            await self.client.srem(self.keys.backfills, job_id)
            return
        entry = json.loads(head)
        previous = await self.client.hgetall(self.keys.fire(job_id, entry["after"]))
        if previous and previous.get("outcome") == "dispatched" and previous.get("run") not in FINISHED:
            return
        now = datetime.now(UTC)
        fire = Fire(
            self.manager.get(job_id), datetime.fromisoformat(entry["scheduled_at"]), trigger=BACKFILL, force=True
        )
        sent_ts = time.time()
        (outcome,) = await self.ledger.decide([backfill_intent(fire, now, self.limits, self.encode)], self.owner)
        if str(outcome) == "dispatched":
            await announce(self.events, [fire], sent_ts)
        await self.client.lpop(queue)
        logger.bind(job_id=job_id, scheduled_at=fire.stamp).info("sequential backfill fire {}", outcome)


_ID = re.compile(r'"id"\s*:\s*"([^"]*)"')


def _id_of(raw: str) -> str:
    """A stored record's job id (its first "id" field: the record's own, written before its
    spec), read without parsing the record; "?" for one without."""
    found = _ID.search(raw)
    return found[1] if found else "?"


def _version_of(raw: str) -> int:
    try:
        return int(json.loads(raw).get("version", 0))
    except (ValueError, AttributeError, TypeError):
        return 0
