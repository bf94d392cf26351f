"""The one operations layer on jobs: what the CLI, the Python client and any HTTP API call.

create, update (with ``expected_version``), delete, get, list (filters, paging), pause, resume,
trigger, backfill, export and apply, each returning typed objects (pydantic models) and raising
the errors of :mod:`shared.errors`: JobSpecError (an invalid spec, each line naming job and
field), UnknownJobError, VersionConflictError, OwnershipError, BackfillLimitError, or a
RedisUnavailableError/redis error when Redis is down (nothing written: every write is one
script). No rule lives here: they are in :mod:`scheduler.planner` (ownership, backfill, what an
edit does) and :mod:`scheduler.specs` (validation).
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis

from scheduler.events import announce
from scheduler.fires import Fire, Limits
from scheduler.joblist import JobIndex
from scheduler.jobmodels import ApplyPlan, BackfillResult, JobPage, TriggerResult
from scheduler.jobstore import (
    API,
    JobRecord,
    JobStore,
    now_iso,
    owned_message,
    source_kind,
    spec_document,
    validate_api_spec,
)
from scheduler.message import TaskMessage
from scheduler.operator import Operator
from scheduler.planner import backfill_problem, plan_backfill, refusal
from scheduler.specs import STORED, JobDefaults, JobSpec, validate_job_documents
from scheduler.triggers import next_fire_times
from scheduler.views import NEVER_RUN, OUTCOMES
from shared.errors import (
    BackfillLimitError,
    JobSpecError,
    OwnershipError,
    RedisUnavailableError,
    UnknownJobError,
    VersionConflictError,
)
from shared.fleet import FireIntent
from shared.names import format_scheduled_at

Encode = Callable[[list[TaskMessage]], list[tuple[str, str]]]
UPDATE_TRIES = 5
"""An update without ``expected_version`` re-reads and retries this often on a conflict."""


def backfill_intent(fire: Fire, now: datetime, limits: Limits, encode: Encode) -> FireIntent:
    """A backfill fire as the ledger decides it: its message expires counted from now (its
    nominal time is past), by the job's ``expires``, else its misfire grace."""
    job = fire.job
    expires = job.expires if job.expires is not None else job.misfire_grace_time
    message = fire.message(now, limits, expires_s=None if expires is None else float(expires))
    return fire.intent(now, limits, encode([message])[0], expires_s=None if expires is None else float(expires))


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _reported(method: F) -> F:
    """Redis down during an operation: one RedisUnavailableError naming the job (the write
    itself is one script, so a change is stored whole or not at all)."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            first = args[0] if args else None
            job_id = first if isinstance(first, str) else getattr(first, "id", None) or (first or {}).get("id", "?")
            raise RedisUnavailableError(
                f"job {job_id!r}: {method.__name__} not stored: redis unavailable ({exc})"
            ) from None

    return wrapper  # type: ignore[return-value]


def _changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


class JobOps:
    """Operations on jobs of one fleet (one Redis and key prefix), as ``by``."""

    def __init__(self, operator: Operator, encode: Encode | None = None, index: JobIndex | None = None) -> None:
        """``index``: the snapshot of the job list to share (one per process or client)."""
        self.operator = operator
        self.index = index if index is not None else JobIndex()
        self.settings = operator.settings
        self.client, self.keys, self.by = operator.client, operator.keys, operator.by
        self.defaults = JobDefaults.from_settings(self.settings.scheduler, self.settings.celery.cron_queue)
        self.store = JobStore(self.client, self.keys, changes_maxlen=self.settings.scheduler.changes_maxlen)
        self._encode = encode

    def _audit(self, action: str, job_id: str, note: str) -> dict[str, Any]:
        return {"at_ms": int(datetime.now(UTC).timestamp() * 1000), "action": action, "job": job_id,
                "note": note, "by": self.by}  # fmt: skip

    # -- reading -------------------------------------------------------------------------
    async def get(self, job_id: str) -> JobRecord:
        """Any job (API, file or code) as a record. Raises UnknownJobError."""
        paused = (await self.operator.control.paused()).get(job_id)
        flags = {"paused": paused is not None, "paused_note": (paused or {}).get("note", "")}
        raw = await self.store.raw(job_id)
        if raw is not None:
            return JobRecord.model_validate({**json.loads(raw), **flags})
        spec, _ = await self.operator.spec(job_id)
        return self._registry_record(spec, flags)

    def _registry_record(self, spec: JobSpec, flags: dict[str, Any]) -> JobRecord:
        kind = source_kind(spec.source)
        return JobRecord(id=spec.id, version=0, source=kind, owner=spec.source, spec=spec_document(spec), **flags)

    async def list(
        self,
        *,
        source: Literal["api", "file", "code"] | None = None,
        paused: bool | None = None,
        prefix: str = "",
        query: str = "",
        queue: str | None = None,
        outcome: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> JobPage:
        """Jobs sorted by id, filtered by source, paused, queue, id prefix, ``query`` (a
        case-insensitive substring of id or task) and ``outcome`` (the last fire's, one of
        :data:`scheduler.joblist.OUTCOMES`; ``never``: no fire yet), one page. Searches the
        process's snapshot of the job list (:class:`scheduler.joblist.JobIndex`: re-read only
        when a job changed); only the page's records are built."""
        if outcome is not None and outcome not in OUTCOMES:
            raise JobSpecError(f"jobs list: outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
        snapshot = await self.index.snapshot(self.client, self.keys)
        paused_flags, needle = await self.operator.control.paused(), query.casefold()
        entries = [entry for entry in snapshot.entries if entry.id.startswith(prefix)
                   and (paused is None or (entry.id in paused_flags) == paused)
                   and entry.matches(source, queue, needle)]  # fmt: skip
        if outcome is not None:
            outcomes = await self.index.last_outcomes(self.client, self.keys, [e.id for e in snapshot.entries])
            entries = [entry for entry in entries if outcomes.get(entry.id, NEVER_RUN) == outcome]
        records = []
        for entry in entries[offset : offset + limit]:
            flag = paused_flags.get(entry.id)
            flags = {"paused": flag is not None, "paused_note": (flag or {}).get("note", "")}
            records.append(JobRecord.model_validate({**json.loads(entry.raw), **flags}) if entry.api
                           else self._registry_record(JobSpec.model_validate(json.loads(entry.raw)["spec"], context=STORED), flags))  # fmt: skip
        return JobPage(items=records, total=len(entries), offset=offset, limit=limit)

    # -- changing API jobs ---------------------------------------------------------------
    def validate(self, document: dict[str, Any] | JobSpec) -> JobSpec:
        """A job-file mapping (or a JobSpec) as an API job; raises JobSpecError."""
        if isinstance(document, JobSpec):
            document = spec_document(document)
        return validate_api_spec(document, self.defaults)

    @_reported
    async def create(self, document: dict[str, Any] | JobSpec, note: str = "") -> JobRecord:
        """Store a new API job (version 1); every replica runs it within a second. Its first
        fire is the first after now (a start in the past replays nothing)."""
        spec = self.validate(document)
        self.operator.check_note(spec.id, note)
        owner = await self._owner(spec.id)
        if owner != API:
            raise OwnershipError(spec.id, owned_message(owner, "create"), owner=owner)
        stamp = now_iso()
        record = JobRecord(id=spec.id, spec=spec_document(spec), created_at=stamp, created_by=self.by,
                           updated_at=stamp, updated_by=self.by, note=note)  # fmt: skip
        had_fires = await self.client.exists(self.keys.history(spec.id))
        audit_note = f"{note} (re-created: fires before {stamp} belong to the deleted job)" if had_fires else note
        version, _ = await self.store.write(
            "create", spec.id, record=record, spec=spec, audit=self._audit("create", spec.id, audit_note.strip())
        )
        return record.model_copy(update={"version": version})

    @_reported
    async def update(
        self,
        job_id: str,
        changes: dict[str, Any] | None = None,
        *,
        spec: dict[str, Any] | JobSpec | None = None,
        expected_version: int | None = None,
        note: str = "",
    ) -> JobRecord:
        """Change an API job: ``changes`` (job-file keys; a new trigger key replaces the old
        one) or a whole new ``spec``. With ``expected_version`` a concurrent change is a
        VersionConflictError; without, a conflict is retried on the fresh version."""
        self.operator.check_note(job_id, note)
        for _ in range(UPDATE_TRIES):
            current = await self._api_record(job_id, "update")
            if expected_version is not None and expected_version != current.version:
                raise VersionConflictError(job_id, expected_version, current.version)
            if spec is not None:
                document = spec_document(spec) if isinstance(spec, JobSpec) else dict(spec)
            else:
                document = dict(current.spec)
                if {"cron", "interval", "date"} & (changes or {}).keys():
                    for key in ("cron", "interval", "date"):
                        document.pop(key, None)
                document.update(changes or {})
            if document.get("id", job_id) != job_id:
                raise JobSpecError(f"job {job_id!r}: id: cannot be changed (to {document['id']!r}); create a new job")
            new_spec = self.validate({**document, "id": job_id})
            record = current.model_copy(
                update={"spec": spec_document(new_spec), "updated_at": now_iso(), "updated_by": self.by, "note": note}
            )
            try:
                version, _ = await self.store.write(
                    "update", job_id, expected=current.version, record=record, spec=new_spec,
                    audit=self._audit("update", job_id, note),
                )  # fmt: skip
            except VersionConflictError as exc:
                if expected_version is not None:
                    raise VersionConflictError(job_id, expected_version, exc.current) from None
                continue
            return record.model_copy(update={"version": version})
        raise VersionConflictError(job_id, current.version, -1)

    @_reported
    async def delete(self, job_id: str, *, expected_version: int | None = None, note: str = "") -> JobRecord:
        """Delete an API job: every replica stops it within a second; running tasks go on.
        Its pause, last fire and failure count go with it (a later create is a new job)."""
        self.operator.check_note(job_id, note)
        current = await self._api_record(job_id, "delete")
        await self.store.write("delete", job_id, expected=expected_version, audit=self._audit("delete", job_id, note))
        return current

    async def _owner(self, job_id: str) -> str:
        """The job's source (a path, "code", "api"), or "api" when no job has the id."""
        try:
            spec, _ = await self.operator.spec(job_id)
        except UnknownJobError:
            return API
        return spec.source

    async def _api_record(self, job_id: str, action: str) -> JobRecord:
        raw = await self.store.raw(job_id)
        if raw is not None:
            return JobRecord.model_validate_json(raw)
        refused = refusal(action, await self._owner(job_id))
        if refused is not None:
            raise OwnershipError(job_id, refused)
        raise UnknownJobError(job_id)

    # -- steering any job ----------------------------------------------------------------
    @_reported
    async def pause(self, job_id: str, note: str = "") -> JobRecord:
        await self.operator.pause(job_id, note=note)
        return await self.get(job_id)

    @_reported
    async def resume(self, job_id: str, note: str = "") -> JobRecord:
        """Dispatch again from the next fire on; the paused ones are not caught up."""
        await self.operator.resume(job_id, note=note)
        return await self.get(job_id)

    @_reported
    async def trigger(self, job_id: str, *, force: bool = False, note: str = "") -> TriggerResult:
        return TriggerResult.model_validate(await self.operator.trigger(job_id, force=force, note=note))

    @_reported
    async def backfill(
        self,
        job_id: str,
        start: datetime,
        end: datetime,
        *,
        overlap: Literal["allow", "sequential"] = "allow",
        note: str = "",
        now: datetime | None = None,
        dry_run: bool = False,
    ) -> BackfillResult:
        """Dispatch every nominal fire in [start, end] that the ledger has not decided, each
        with its own ``scheduled_at`` and ``trigger: backfill``, even when the job is paused:
        all at once (``allow``) or one after another in nominal order (``sequential``).
        ``dry_run``: the same answer, nothing sent or recorded (the console's preview)."""
        if self._encode is None:
            raise RuntimeError("these operations cannot publish (no encoder)")
        self.operator.check_note(job_id, note)
        now = now or datetime.now(UTC)
        spec, _ = await self.operator.spec(job_id)
        limit = self.settings.scheduler.backfill_max_fires
        times = [t for t in next_fire_times(spec, start - timedelta(microseconds=1), limit + 1) if t <= end]
        if (problem := backfill_problem(len(times), start, end, now, limit)) is not None:
            raise BackfillLimitError(f"job {job_id!r}: backfill: {problem}")
        stamps = [format_scheduled_at(t) for t in times]
        decided = [bool(d) for d in await self.operator.ledger.decided([(job_id, s) for s in stamps])] if times else []
        first, later = plan_backfill(spec, times, decided, now, sequential=overlap == "sequential")
        already = [s for s, d in zip(stamps, decided, strict=True) if d]
        if dry_run:
            return BackfillResult(job=job_id, overlap=overlap, dispatched=[f.stamp for f in first],
                                  already_decided=already, queued=[f.stamp for f in later], dry_run=True)  # fmt: skip
        limits = self.operator.limits
        intents = [backfill_intent(fire, now, limits, self._encode) for fire in first]
        sent_ts = time.time()  # before the publish: a worker may receive the task at once
        results = await self.operator.ledger.decide(intents, f"api:{self.by}") if intents else []
        out = [(fire, i) for fire, i, r in zip(first, intents, results, strict=True) if str(r) == "dispatched"]
        await announce(self.operator.events, [fire for fire, _ in out], sent_ts)
        dispatched = [i.scheduled_at for _, i in out]
        queued = [fire.stamp for fire in later]
        if queued:
            await self._queue_sequential(job_id, [*[i.scheduled_at for i in intents], *queued])
        await self.operator.control.record(
            "backfill", job_id, note=f"{note} [{stamps[0] if stamps else '-'} .. {stamps[-1] if stamps else '-'}: "
            f"{len(dispatched)} dispatched, {len(queued)} queued, {sum(decided)} already decided]".strip(),
            by=self.by,
        )  # fmt: skip
        return BackfillResult(
            job=job_id, overlap=overlap, dispatched=dispatched, already_decided=already, queued=queued
        )

    async def _queue_sequential(self, job_id: str, stamps: Sequence[str]) -> None:
        """Each queued fire names the one before it: it goes out once that one finished."""
        entries = [json.dumps({"scheduled_at": s, "after": p}) for p, s in itertools.pairwise(stamps)]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(self.keys.backfill(job_id), *entries)
            pipe.sadd(self.keys.backfills, job_id)
            await pipe.execute()

    # -- declarative -----------------------------------------------------------------------
    async def export(self) -> dict[str, Any]:
        """Every job as one job file (JSON-ready): ``{"jobs": [...]}``, sorted by id."""
        page = await self.list(limit=10**9)
        return {"jobs": [record.spec for record in page.items]}

    @_reported
    async def apply(
        self, document: dict[str, Any], *, label: str = "apply", prune: bool = False, dry_run: bool = False,
        note: str = "",
    ) -> ApplyPlan:  # fmt: skip
        """Make the API jobs equal the job file ``document``: create, update and (``prune``)
        delete. Jobs of files and code in it must match them exactly (else OwnershipError).
        The whole document is validated first: an invalid one changes nothing."""
        specs = validate_job_documents([(Path(label), document)], self.defaults)
        for spec in specs:  # before any change: a plan is applied whole or refused
            self.operator.check_note(spec.id, note)
        registry = await self.operator.control.jobs()
        api = {k: JobRecord.model_validate_json(v) for k, v in (await self.store.all_raw()).items()}
        plan, owned_problems = ApplyPlan(), {}
        for spec in specs:
            wanted = spec_document(spec)
            if spec.id in api:
                diff = _changed_fields(api[spec.id].spec, wanted)
                (plan.update if diff else plan.unchanged).append(spec.id)
                plan.diff += [f"~ {spec.id}: {line}" for line in diff]
            elif spec.id in registry:
                owner = JobSpec.model_validate(registry[spec.id]["spec"], context=STORED)
                if spec_document(owner) != wanted:
                    owned_problems[spec.id] = f"{refusal('update', owner.source)} (the file differs from it)"
                plan.unchanged.append(spec.id)
            else:
                plan.create.append(spec.id)
                plan.diff.append(f"+ {spec.id}")
        if prune:
            plan.delete = sorted(set(api) - {spec.id for spec in specs})
            plan.diff += [f"- {job_id}" for job_id in plan.delete]
        if owned_problems:
            first = next(iter(owned_problems))
            others = "".join(f"; job {job_id!r}: {why}" for job_id, why in list(owned_problems.items())[1:])
            raise OwnershipError(first, owned_problems[first] + others)
        if dry_run:
            return plan
        by_id = {spec.id: spec for spec in specs}
        for job_id in plan.create:
            await self.create(by_id[job_id], note=note)
        for job_id in plan.update:
            await self.update(job_id, spec=by_id[job_id], expected_version=api[job_id].version, note=note)
        for job_id in plan.delete:
            await self.delete(job_id, expected_version=api[job_id].version, note=note)
        return plan.model_copy(update={"applied": True})
