"""What ``chronoq jobs ...`` and ``chronoq status`` do: reads and changes in Redis only.

No replica has to be reached: replicas publish the jobs they run into the ``jobs`` registry and
re-read the ``paused`` and ``removed`` flags every half second, so a change made here reaches
every replica within a second and outlives all of them. Every change is written to the audit
list with when, by whom and a note.

A manual ``trigger`` is decided and published here, by the same atomic script the replicas use
(:class:`shared.fleet.FireLedger`): it is recorded in the job's history like any fire (trigger
``manual``), respects the job's overlap policy unless forced, and runs even when the job is
paused (a pause stops the schedule, not an operator's explicit request).
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from loguru import logger

from scheduler.bounds import MAX_NAME_CHARS, MAX_NOTE_CHARS, name_repr, text_problem
from scheduler.control import ControlStore
from scheduler.epoch import redis_facts
from scheduler.events import SentEvents, announce
from scheduler.fires import Fire, Limits
from scheduler.jobstore import source_kind
from scheduler.planner import plan_manual
from scheduler.specs import STORED, JobSpec
from scheduler.state import StateStore
from scheduler.triggers import describe_trigger, next_fire_times
from scheduler.views import audit_counts, fire_view
from shared.coverage import unserved_tasks
from shared.errors import ChronoqError, JobSpecError, UnknownJobError
from shared.fleet import Outcome, scheduler_ledger
from shared.names import RedisKeys, format_scheduled_at
from shared.settings import AppSettings

WORKER_SEEN_S = 10.0
"""A worker whose heartbeat is older than this is listed as not seen."""


def operator_name() -> str:
    """Who made a change, for the audit list: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{os.uname().nodename}"


class Operator:
    """The operator commands against one Redis and key prefix."""

    def __init__(
        self,
        settings: AppSettings,
        client: redis.asyncio.Redis,
        *,
        encode: Callable[[Fire, datetime], tuple[str, str]] | None = None,
        queue_keys: Callable[[str], list[str]] | None = None,
        by: str | None = None,
        events: SentEvents | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.control = ControlStore(client, self.keys)
        self.state = StateStore(client, self.keys)
        self.ledger = scheduler_ledger(client, settings)
        self.limits = Limits.from_settings(settings)
        self._encode = encode
        self._queue_keys = queue_keys or (lambda queue: [queue])
        self.by = by or operator_name()
        self.events = events
        """Announces the fires it or its :class:`~scheduler.jobops.JobOps` dispatch (a manual trigger, a
        backfill) with Celery's task-sent event; None: events are off."""

    # -- reading -------------------------------------------------------------------------------

    async def spec(self, job_id: str) -> tuple[JobSpec, dict[str, Any]]:
        """The job as the replicas loaded it, and its registry entry."""
        raw = await self.client.hget(self.keys.jobs, job_id)
        if raw is None:
            raise UnknownJobError(job_id)
        entry: dict[str, Any] = json.loads(raw)
        return JobSpec.model_validate(entry["spec"], context=STORED), entry

    async def list_jobs(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every registered job: id, task, trigger, next fire, last fire and outcome, paused."""
        return await self.summaries(None, now)

    async def summaries(self, job_ids: list[str] | None, now: datetime | None = None) -> list[dict[str, Any]]:
        """:meth:`list_jobs` rows of ``job_ids`` (None: every job) in that order; ids the
        registry does not hold are left out (a page of the console reads only its rows)."""
        now = now or datetime.now(UTC)
        if job_ids is None:
            registry = await self.control.jobs()
        else:  # only these entries: a page of 50 costs the same with 10,000 jobs
            found = await self.client.hmget(self.keys.jobs, job_ids) if job_ids else []
            registry = {job_id: json.loads(raw) for job_id, raw in zip(job_ids, found, strict=True) if raw}
        paused = await self.control.paused()
        ids = sorted(registry) if job_ids is None else [job_id for job_id in job_ids if job_id in registry]
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.lindex(self.keys.history(job_id), 0)
            latest = dict(zip(ids, await pipe.execute(), strict=True))
        fired = [job_id for job_id in ids if latest[job_id] is not None]
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id in fired:
                pipe.hgetall(self.keys.fire(job_id, str(latest[job_id])))
            last_fires = dict(zip(fired, await pipe.execute(), strict=True))
        return [
            self._summary(
                JobSpec.model_validate(registry[job_id]["spec"], context=STORED),
                now,
                fire_view(last_fires[job_id]) if last_fires.get(job_id) else {},
                paused.get(job_id),
            )
            for job_id in ids
        ]

    def _summary(
        self, spec: JobSpec, now: datetime, last: dict[str, Any], paused: dict[str, Any] | None
    ) -> dict[str, Any]:
        """``last``: the job's latest fire as :func:`scheduler.views.fire_view` shows it ({} if none)."""
        upcoming = next_fire_times(spec, now, 1) if spec.enabled else []
        return {
            "id": spec.id,
            "task": spec.task,
            "queue": spec.queue,
            "trigger": describe_trigger(spec),
            "enabled": spec.enabled,
            "source": source_kind(spec.source),
            "owner": spec.source,
            "next_fire": upcoming[0].isoformat() if upcoming else None,
            "last_fire": last.get("scheduled_at") if last else None,
            "last_outcome": last.get("final"),
            "paused": paused is not None,
            "paused_note": (paused or {}).get("note", ""),
        }

    async def show(self, job_id: str, *, history: int = 10, now: datetime | None = None) -> dict[str, Any]:
        """One job: its spec, next 5 fires, history, counters, pause and the audit trail."""
        now = now or datetime.now(UTC)
        spec, entry = await self.spec(job_id)
        paused = (await self.control.paused()).get(job_id)
        fires = await self.state.history(job_id, history)
        return {
            **self._summary(spec, now, fires[0] if fires else {}, paused),
            "spec": entry["spec"],
            "next_fires": [t.isoformat() for t in next_fire_times(spec, now, 5)] if spec.enabled else [],
            "history": fires,
            "counters": await self.state.counters(job_id),
            "audit": await self.control.audit(job_id, limit=10),
            "inflight": await self.client.zcard(self.keys.inflight(job_id)),
        }

    async def status(self) -> dict[str, Any]:
        """Replicas and their roles, queue depths, workers seen, outcome counters, and ``failing``:
        jobs whose last fires failed, with how many in a row."""
        now_ms = int(time.time() * 1000)
        lease_s = self.settings.scheduler.takeover_s
        leader = await self.client.get(self.keys.leader)
        replicas = []
        for replica_id, info, age_s in await self._beats(self.keys.replicas, "heartbeat_ms", now_ms):
            replicas.append(
                {
                    "id": str(replica_id),
                    "role": "leader" if replica_id == leader else "follower",
                    "alive": age_s <= max(3 * lease_s, 5.0),
                    "heartbeat_age_s": round(age_s, 1),
                    **{k: info.get(k) for k in ("host", "pid", "started_at", "jobs", "outcomes")},
                }
            )
        workers = []
        for hostname, info, age_s in await self._beats(self.keys.workers, "last_seen_ms", now_ms):
            workers.append(
                {
                    "hostname": str(hostname),
                    "seen": age_s <= WORKER_SEEN_S,
                    "last_seen_age_s": round(age_s, 1),
                    "pid": info.get("pid"),
                    "queues": info.get("queues", []),
                }
            )
        queues = {}
        for queue in dict.fromkeys((self.settings.celery.cron_queue, self.settings.celery.default_queue)):
            async with self.client.pipeline(transaction=False) as pipe:
                for key in self._queue_keys(queue):
                    pipe.llen(key)
                queues[queue] = sum(await pipe.execute())
        return {
            "leader": leader,
            "replicas": replicas,
            "queues": queues,
            "unacked": await self.client.hlen("unacked"),
            "workers": workers,
            "jobs": await self.client.hlen(self.keys.jobs),
            "paused": await self.client.hlen(self.keys.paused),
            "buffered": await self.client.scard(self.keys.buffered),
            "invalid_jobs": {k: json.loads(v) for k, v in (await self.client.hgetall(self.keys.invalid_jobs)).items()},
            "counters": (counters := await self.state.counters()),
            "audit": audit_counts(counters),
            "awaiting_start": await self.client.zcard(self.keys.dispatched),
            "failing": {k: int(v) for k, v in sorted((await self.client.hgetall(self.keys.fail_streak)).items())},
            "unserved_tasks": unserved_tasks(
                await self.client.hgetall(self.keys.jobs), await self.client.hgetall(self.keys.workers), now_ms
            ),
            **await redis_facts(self.client, self.keys),
        }

    async def _beats(self, key: str, field: str, now_ms: int) -> list[tuple[str, dict[str, Any], float]]:
        """A heartbeat hash as (id, info, seconds since its last beat), sorted by id."""
        beats = []
        for member, raw in sorted((await self.client.hgetall(key)).items()):
            info = json.loads(raw)
            beats.append((str(member), info, (now_ms - int(info.get(field, 0))) / 1000))
        return beats

    # -- changing ------------------------------------------------------------------------------

    def check_note(self, job_id: str, note: str) -> None:
        """Refuse a change whose note (or whose ``by``) is over its limit, before anything is
        written; raises JobSpecError naming the job and the field. Every change of this class
        and of :class:`scheduler.jobops.JobOps` calls it first."""
        fields = (("note", note, MAX_NOTE_CHARS), ("by", self.by, MAX_NAME_CHARS))
        problems = [f"job {name_repr(job_id)}: {name}: {problem}" for name, value, limit in fields
                    if (problem := text_problem(value, limit)) is not None]  # fmt: skip
        if problems:
            raise JobSpecError(problems)

    async def pause(self, job_id: str, note: str = "") -> dict[str, Any]:
        self.check_note(job_id, note)
        await self.spec(job_id)
        await self.control.pause(job_id, note=note, by=self.by)
        return {"job": job_id, "paused": True, "note": note}

    async def resume(self, job_id: str, note: str = "") -> dict[str, Any]:
        self.check_note(job_id, note)
        await self.spec(job_id)
        was_paused = job_id in await self.control.paused()
        await self.control.resume(job_id, note=note, by=self.by)
        return {"job": job_id, "paused": False, "was_paused": was_paused, "note": note}

    async def remove(self, job_id: str, note: str = "") -> dict[str, Any]:
        self.check_note(job_id, note)
        spec, entry = await self.spec(job_id)
        await self.control.remove(job_id, str(entry.get("source_hash", "")), spec.source, note=note, by=self.by)
        return {"job": job_id, "removed": True, "source": spec.source, "note": note}

    async def trigger(self, job_id: str, *, force: bool = False, note: str = "") -> dict[str, Any]:
        """Fire the job now, once: decided and published like a scheduled fire."""
        if self._encode is None:
            raise ChronoqError("this operator cannot publish (no encoder)")
        self.check_note(job_id, note)
        spec, _ = await self.spec(job_id)
        now = datetime.now(UTC)
        fire = plan_manual(spec, now, force=force)
        intent = fire.intent(now, self.limits, self._encode(fire, now))
        sent_ts = time.time()  # before the publish: a worker may receive the task at once
        (result,) = await self.ledger.decide([intent], f"cli:{self.by}:{os.getpid()}")
        outcome = str(result)
        if outcome == Outcome.DISPATCHED:
            await announce(self.events, [fire], sent_ts)
        fire_hash = await self.client.hgetall(self.keys.fire(job_id, intent.scheduled_at))
        await self.control.record(
            "trigger" + (" --force" if force else ""), job_id, note=f"{note} ({outcome})".strip(), by=self.by
        )
        logger.bind(job_id=job_id, task_id=intent.task_id).info("manual fire {}", outcome)
        return {
            "job": job_id,
            "outcome": outcome,
            "task_id": intent.task_id,
            "scheduled_at": format_scheduled_at(now),
            "reason": fire_hash.get("reason", ""),
            "forced": force,
            "dispatched": outcome == Outcome.DISPATCHED,
        }


async def with_operator(settings: AppSettings, action: Callable[[Operator], Awaitable[Any]]) -> Any:
    """Run ``action`` with an operator that can also publish (a manual trigger)."""
    from scheduler.encoder import MessageEncoder
    from shared.celery_app import create_celery_app
    from shared.redis import create_async_redis

    app = create_celery_app(settings, name="chronoq-cli")
    encoder = MessageEncoder(app)
    client = create_async_redis(settings.redis)
    limits = Limits.from_settings(settings)

    def encode(fire: Fire, now: datetime) -> tuple[str, str]:
        return encoder.encode([fire.message(now, limits)])[0]

    try:
        events = SentEvents.for_app(app, client)
        return await action(Operator(settings, client, encode=encode, queue_keys=encoder.queue_keys, events=events))
    finally:
        await client.aclose()
        app.close()
