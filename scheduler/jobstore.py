"""Jobs created at runtime, stored in Redis as JSON: records, validation and the atomic write.

Each API job is one field of the ``api_jobs`` hash: ``{"version": N, "id", "source": "api",
"spec": {...job-file keys...}, "created_at", "created_by", "updated_at", "updated_by", "note"}``.
The spec is validated by the same :class:`~scheduler.specs.JobSpec` as job files, with the same
messages naming job and field, before anything is written, and stored complete (every default
resolved), so every replica runs the same job whatever its own settings. Every write is one Lua
script (``shared/lua/jobwrite.lua``): the version check, the record, the job registry entry, the
change-feed entry and the audit entry land together or not at all.

Replicas follow the ``changes`` stream (:mod:`scheduler.jobfeed`) and validate each record
again when they load it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

import redis.asyncio
from pydantic import BaseModel, ValidationError

from scheduler.bounds import name_repr
from scheduler.planner import refusal
from scheduler.specs import STORED, TRIGGER_KEYS, JobDefaults, JobSpec, _describe, trigger_problem
from shared import lua
from shared.errors import (
    JobSpecError,
    NotReplicatedError,
    OwnershipError,
    RedisUnavailableError,
    UnknownJobError,
    VersionConflictError,
)
from shared.names import RedisKeys

API = "api"
AUDIT_LIMIT = 1000  # as scheduler.control


class JobRecord(BaseModel):
    """One job as the operations layer shows it, whatever its source.

    ``source`` is ``api``, ``file`` or ``code``; ``owner`` names the job file (or ``code``, or
    ``api``). ``version`` counts the API job's changes (0 for file and code jobs, which are
    versioned by their file). ``spec`` holds job-file keys, every default resolved.
    """

    id: str
    version: int = 0
    source: Literal["api", "file", "code"] = "api"
    owner: str = API
    spec: dict[str, Any]
    created_at: str | None = None
    created_by: str | None = None
    updated_at: str | None = None
    updated_by: str | None = None
    note: str = ""
    paused: bool = False
    paused_note: str = ""


def source_kind(source: str) -> Literal["api", "file", "code"]:
    """``JobSpec.source`` (a path, "code" or "api") as a kind."""
    return "api" if source == API else "code" if source == "code" else "file"


def spec_document(spec: JobSpec) -> dict[str, Any]:
    """The spec as job-file keys (JSON types), complete: unset options are dropped, except
    ``misfire_grace_time: null`` (no limit), which differs from leaving it out."""
    dumped = spec.model_dump(mode="json", by_alias=True, exclude={"source"})
    ordered = {"id": dumped.pop("id"), "task": dumped.pop("task"), **dumped}
    return {k: v for k, v in ordered.items() if v is not None or k == "misfire_grace_time"}


def validate_api_spec(document: Any, defaults: JobDefaults | None, label: str = "", *, stored: bool = False) -> JobSpec:
    """A job-file mapping validated as an API job (source ``api``), on ``defaults`` (None: the
    mapping is complete, as a stored spec is).

    Raises JobSpecError with one line per problem, each naming the job and the field:
    ``job 'x': cron '61 * * * *': minute must be 0-59`` (``label`` goes first when given).
    ``stored``: a record read back from Redis (:data:`scheduler.specs.STORED`).
    """
    prefix = f"{label}: " if label else ""
    if not isinstance(document, dict):
        raise JobSpecError(
            f"{prefix}a job must be a mapping with id, task and a trigger, not {type(document).__name__}"
        )
    job_id = document.get("id")
    place = f"{prefix}job {name_repr(job_id)}" if isinstance(job_id, str) else f"{prefix}job (no id)"
    found: list[str] = []
    if "source" in document:
        found.append("unknown key 'source'")
    try:
        base = {} if defaults is None else defaults.model_dump()
        spec = JobSpec.model_validate({**base, **document, "source": API}, context=STORED if stored else None)
    except ValidationError as exc:
        if (problem := trigger_problem(*(document.get(key) for key in TRIGGER_KEYS))) is not None:
            found.append(problem)
        found += _describe(exc)
    if found:
        raise JobSpecError([f"{place}: {line}" for line in dict.fromkeys(found)])
    return spec


def parse_record(raw: str) -> tuple[dict[str, Any], JobSpec]:
    """A stored record (JSON as stored: version, id, spec...) and its spec, validated again
    (no defaults: a stored spec is complete). Raises JobSpecError naming the job and field."""
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
            raise ValueError("no spec mapping")
        int(record["version"])
    except (ValueError, TypeError, KeyError) as exc:
        raise JobSpecError(f"stored API job: not a valid record ({exc})") from None
    spec = validate_api_spec(record["spec"], None, label="stored", stored=True)
    if spec.id != record.get("id"):
        raise JobSpecError(f"stored job {record.get('id')!r}: id: the spec says {spec.id!r}")
    return record, spec


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JobStore:
    """Async access to the API jobs under one key prefix; every write is one script call."""

    def __init__(self, client: redis.asyncio.Redis, keys: RedisKeys, *, changes_maxlen: int = 10_000) -> None:
        self.client = client
        self.keys = keys
        self.changes_maxlen = changes_maxlen
        self._write = client.register_script(lua.source("jobwrite"))

    async def raw(self, job_id: str) -> str | None:
        value = await self.client.hget(self.keys.api_jobs, job_id)
        return None if value is None else str(value)

    async def all_raw(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (await self.client.hgetall(self.keys.api_jobs)).items()}

    async def all_values(self) -> list[str]:
        """Every stored record (HVALS: half the reply of HGETALL; each record names its id)."""
        return [str(v) for v in await self.client.hvals(self.keys.api_jobs)]

    async def write(
        self,
        op: Literal["create", "update", "delete"],
        job_id: str,
        *,
        expected: int | None = None,
        record: JobRecord | None = None,
        spec: JobSpec | None = None,
        audit: dict[str, Any],
    ) -> tuple[int, bool]:
        """Apply one change atomically; returns (the new version, whether the id had fires of
        an earlier, deleted job). Raises VersionConflictError, OwnershipError, UnknownJobError
        (nothing written), or RedisUnavailableError (one script: all of it or nothing)."""
        k = self.keys
        body = "{}" if record is None else record.model_dump_json(exclude={"version", "paused", "paused_note"})
        registry = "" if spec is None else f'{{"spec": {spec.model_dump_json(by_alias=True)}, "source_hash": ""}}'
        keys = [k.api_jobs, k.changes, k.audit, k.jobs, k.paused, k.last_fire, k.fail_streak, k.history(job_id)]
        args = [op, job_id, "" if expected is None else expected, body, registry, json.dumps(audit)]
        try:
            result = await self._write(keys=[*keys, k.invalid_jobs], args=[*args, AUDIT_LIMIT, self.changes_maxlen])
        except redis.TimeoutError as exc:
            raise RedisUnavailableError(
                f"job {job_id!r}: {op}: redis did not answer in time ({exc}); the change was applied whole or "
                "not at all: read the job to see which (its version tells)"
            ) from None
        except NotReplicatedError as exc:
            raise RedisUnavailableError(
                f"job {job_id!r}: {op}: not confirmed by the replicas ({exc}); it may have been applied on a "
                "master that was replaced: read the job to see (its version tells)"
            ) from None
        except (redis.ConnectionError, OSError) as exc:
            raise RedisUnavailableError(f"job {job_id!r}: {op} not stored: redis unavailable ({exc})") from None
        verdict, value = str(result[0]), str(result[1])
        if verdict == "ok":
            return int(value), bool(int(result[2]))
        if verdict == "conflict":
            raise VersionConflictError(job_id, -1 if expected is None else expected, int(value))
        if verdict == "exists":
            raise OwnershipError(job_id, f"already exists (an API job, version {value}); update or delete it")
        if verdict == "owned":
            raise OwnershipError(job_id, owned_message(value, op), owner=value)
        raise UnknownJobError(job_id)

    # -- the change feed -------------------------------------------------------------------
    async def position(self) -> str:
        """The id of the feed's newest entry ('0-0' when there is none)."""
        newest = await self.client.xrevrange(self.keys.changes, "+", "-", count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def read(self, after: str, block_ms: int, count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """Change-feed entries after ``after``, waiting up to ``block_ms`` for the first."""
        found: Any = await self.client.xread({self.keys.changes: after}, count=count, block=block_ms)
        return [(str(i), {str(a): str(b) for a, b in f.items()}) for _, entries in found for i, f in entries]

    async def trimmed_past(self, after: str) -> bool:
        """Whether entries after ``after`` that a reader has not read were trimmed away. Entry
        ids are a sequence (``N-0``, see jobwrite.lua): the oldest entry left is past N + 1."""
        oldest: Any = await self.client.xrange(self.keys.changes, "-", "+", count=1)
        return bool(oldest) and sequence(str(oldest[0][0])) > sequence(after) + 1


def sequence(entry_id: str) -> int:
    """The sequence number of a change-feed entry id ``N-0``."""
    return int(entry_id.partition("-")[0])


def owned_message(owner: str, op: str) -> str:
    """Why an API change of a file or code job is refused, naming its owner."""
    if op == "create":
        where = "code (TASK_MODULES)" if owner == "code" else f"job file {owner}"
        return f"id is already used by a job declared in {where}; pick another id"
    return refusal(op, owner) or f"belongs to {owner}"
