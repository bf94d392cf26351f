"""What operators change at runtime, shared through Redis by every replica and the CLI.

- ``jobs``: each job's spec as the replicas loaded it (what ``chronoq jobs list`` shows);
- ``paused``: paused jobs, with when, by whom and a note; a paused job's fires are recorded as
  skipped on every replica;
- ``removed``: jobs removed at runtime. A removed job stays removed across restarts and reloads
  until its definition changes: the file it came from (or, for a job declared in code, its
  declaration) hashes differently from when it was removed;
- ``audit``: every change, newest first;
- ``control``: a pub/sub channel announcing each change, for tools that want to follow them;
  replicas themselves re-read ``paused`` and ``removed`` every half second.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import redis.asyncio

from shared.names import RedisKeys

if TYPE_CHECKING:
    from scheduler.specs import JobSpec

AUDIT_LIMIT = 1000
PUBLISH_CHUNK = 2000


def _job_entries(specs: list[JobSpec], hashes: dict[str, str]) -> dict[str, str]:
    # pydantic's own JSON serializer: a fifth of the cost of model_dump(mode="json") + json.dumps.
    return {
        spec.id: f'{{"spec": {spec.model_dump_json(by_alias=True)}, "source_hash": "{source_hash(spec, hashes)}"}}'
        for spec in specs
    }


def source_hash(spec: JobSpec, file_hashes: dict[str, str] | None = None) -> str:
    """What a removal is pinned to: the job file's content hash, or the spec's own for a job
    declared in code."""
    if file_hashes is not None and spec.source in file_hashes:
        return file_hashes[spec.source]
    if spec.source != "code" and Path(spec.source).is_file():
        return hashlib.sha256(Path(spec.source).read_bytes()).hexdigest()
    return hashlib.sha256(spec.model_dump_json(by_alias=True).encode()).hexdigest()


def file_hashes(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each readable job file, keyed like ``JobSpec.source``."""
    hashes = {}
    for path in paths:
        try:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            continue
    return hashes


class ControlStore:
    """Async access to the operator state under one key prefix."""

    def __init__(self, client: redis.asyncio.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    async def publish_jobs(self, specs: Iterable[JobSpec], hashes: dict[str, str], dropped: Iterable[str] = ()) -> None:
        """Record the jobs this replica runs (and forget ``dropped`` ones).

        The JSON is built on a thread and written PUBLISH_CHUNK jobs per HSET: at 100,000 jobs
        building it takes seconds, which the event loop spends dispatching fires instead. API
        jobs are left out: ``shared/lua/jobwrite.lua`` writes theirs with every change."""
        specs = [spec for spec in specs if spec.source != "api"]
        for first in range(0, len(specs), PUBLISH_CHUNK):
            chunk = specs[first : first + PUBLISH_CHUNK]
            entries = await anyio.to_thread.run_sync(_job_entries, chunk, hashes)
            await self.client.hset(self.keys.jobs, mapping=entries)  # type: ignore[arg-type]
        if gone := list(dropped):
            await self.client.hdel(self.keys.jobs, *gone)
        await self.client.incr(self.keys.jobs_version)  # after the writes: a reader never keeps an older list

    async def jobs(self) -> dict[str, dict[str, Any]]:
        raw = await self.client.hgetall(self.keys.jobs)
        return {str(k): json.loads(v) for k, v in raw.items()}

    async def paused(self) -> dict[str, dict[str, Any]]:
        raw = await self.client.hgetall(self.keys.paused)
        return {str(k): json.loads(v) for k, v in raw.items()}

    async def removed(self) -> dict[str, dict[str, Any]]:
        raw = await self.client.hgetall(self.keys.removed)
        return {str(k): json.loads(v) for k, v in raw.items()}

    async def pause(self, job_id: str, note: str = "", by: str = "") -> None:
        await self._change("pause", job_id, note, by, lambda pipe, entry: pipe.hset(self.keys.paused, job_id, entry))

    async def resume(self, job_id: str, note: str = "", by: str = "") -> None:
        await self._change("resume", job_id, note, by, lambda pipe, entry: pipe.hdel(self.keys.paused, job_id))

    async def remove(self, job_id: str, source_hash_: str, source: str, note: str = "", by: str = "") -> None:
        def apply(pipe: Any, entry: str) -> None:
            removed = {**json.loads(entry), "source": source, "source_hash": source_hash_}
            pipe.hset(self.keys.removed, job_id, json.dumps(removed))
            pipe.hdel(self.keys.paused, job_id)
            pipe.hdel(self.keys.jobs, job_id)
            pipe.incr(self.keys.jobs_version)

        await self._change("remove", job_id, note, by, apply)

    async def restore(self, job_id: str, note: str = "", by: str = "") -> None:
        """Forget a removal (done by replicas when the job's definition changed)."""
        await self._change("restore", job_id, note, by, lambda pipe, entry: pipe.hdel(self.keys.removed, job_id))

    async def record(self, action: str, job_id: str, note: str = "", by: str = "") -> None:
        """An audit entry for an action that changes no flag (a manual trigger)."""
        await self._change(action, job_id, note, by, lambda pipe, entry: None)

    async def _change(self, action: str, job_id: str, note: str, by: str, apply: Any) -> None:
        entry = json.dumps({"at_ms": int(time.time() * 1000), "action": action, "job": job_id, "note": note, "by": by})
        async with self.client.pipeline(transaction=True) as pipe:
            apply(pipe, entry)
            pipe.lpush(self.keys.audit, entry)
            pipe.ltrim(self.keys.audit, 0, AUDIT_LIMIT - 1)
            pipe.publish(self.keys.control, json.dumps({"action": action, "job": job_id}))
            await pipe.execute()

    async def audit(self, job_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        entries = [json.loads(e) for e in await self.client.lrange(self.keys.audit, 0, AUDIT_LIMIT - 1)]
        return [e for e in entries if job_id is None or e["job"] == job_id][:limit]
