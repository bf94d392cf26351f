"""The Python API on jobs: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio, for
FastAPI-style apps), both thin faces of :class:`scheduler.jobops.JobOps`.

:class:`Client` is :class:`shared.client.Client` (submit, chain, result...) plus the job
operations. It lives in ``scheduler`` because jobs are validated by
:class:`~scheduler.specs.JobSpec` (cron parsing, APScheduler triggers), which ``shared`` does
not import; an application that only submits tasks keeps using ``shared.client.Client``.

>>> with Client(settings) as client:
...     job = client.create({"id": "report-42", "task": "reports.build", "cron": "0 2 * * *"})
...     client.update("report-42", {"args": [7]}, expected_version=job.version)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, Literal, TypeVar

from celery import Celery

from scheduler.encoder import MessageEncoder
from scheduler.events import SentEvents
from scheduler.fires import Limits
from scheduler.joblist import JobIndex
from scheduler.jobmodels import ApplyPlan, BackfillResult, JobPage, TriggerResult
from scheduler.jobops import JobOps
from scheduler.jobstore import JobRecord
from scheduler.message import TaskMessage
from scheduler.operator import Operator
from scheduler.specs import JobSpec
from shared.celery_app import create_celery_app
from shared.client import Client as TaskClient
from shared.redis import create_async_redis
from shared.settings import AppSettings

T = TypeVar("T")
Source = Literal["api", "file", "code"]


class AsyncClient:
    """Job operations from asyncio code. ``async with AsyncClient(settings) as jobs: ...``"""

    def __init__(self, settings: AppSettings, app: Celery | None = None, *, by: str | None = None) -> None:
        self.settings = settings
        self._own_app = app is None
        self.app = app or create_celery_app(settings, name="chronoq-client")
        self._encoder = MessageEncoder(self.app)
        self._limits = Limits.from_settings(settings)
        self.redis = create_async_redis(settings.redis)
        self._events = SentEvents.for_app(self.app, self.redis)
        """Manual fires and backfills announce themselves (task-sent) as scheduled ones do."""
        self.index = JobIndex()
        """One snapshot of the job list for every ``ops_as`` user of this client."""
        self.ops = self.ops_as(by)

    def ops_as(self, by: str | None) -> JobOps:
        """The operations on this client's Redis and Celery app, recorded in the audit trail as
        ``by`` (one client serving many users: the web console). Cheap: builds no connection."""
        encoder, limits = self._encoder, self._limits

        def encode_fire(fire: Any, now: datetime) -> tuple[str, str]:
            return encoder.encode([fire.message(now, limits)])[0]

        def encode(messages: list[TaskMessage]) -> list[tuple[str, str]]:
            return encoder.encode(messages)

        operator = Operator(
            self.settings, self.redis, encode=encode_fire, queue_keys=encoder.queue_keys, by=by, events=self._events
        )
        return JobOps(operator, encode, self.index)

    async def create(self, spec: dict[str, Any] | JobSpec, *, note: str = "") -> JobRecord:
        return await self.ops.create(spec, note=note)

    async def update(
        self,
        job_id: str,
        changes: dict[str, Any] | None = None,
        *,
        spec: dict[str, Any] | JobSpec | None = None,
        expected_version: int | None = None,
        note: str = "",
    ) -> JobRecord:
        return await self.ops.update(job_id, changes, spec=spec, expected_version=expected_version, note=note)

    async def delete(self, job_id: str, *, expected_version: int | None = None, note: str = "") -> JobRecord:
        return await self.ops.delete(job_id, expected_version=expected_version, note=note)

    async def get(self, job_id: str) -> JobRecord:
        return await self.ops.get(job_id)

    async def list(
        self,
        *,
        source: Source | None = None,
        paused: bool | None = None,
        prefix: str = "",
        query: str = "",
        queue: str | None = None,
        outcome: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> JobPage:
        """See :meth:`scheduler.jobops.JobOps.list` (``outcome``: ``failed``, ``never``...)."""
        return await self.ops.list(source=source, paused=paused, prefix=prefix, query=query, queue=queue,
                                   outcome=outcome, offset=offset, limit=limit)  # fmt: skip

    async def pause(self, job_id: str, *, note: str = "") -> JobRecord:
        return await self.ops.pause(job_id, note)

    async def resume(self, job_id: str, *, note: str = "") -> JobRecord:
        return await self.ops.resume(job_id, note)

    async def trigger(self, job_id: str, *, force: bool = False, note: str = "") -> TriggerResult:
        return await self.ops.trigger(job_id, force=force, note=note)

    async def backfill(
        self,
        job_id: str,
        start: datetime,
        end: datetime,
        *,
        overlap: Literal["allow", "sequential"] = "allow",
        note: str = "",
    ) -> BackfillResult:
        return await self.ops.backfill(job_id, start, end, overlap=overlap, note=note)

    async def export(self) -> dict[str, Any]:
        return await self.ops.export()

    async def apply(
        self,
        document: dict[str, Any],
        *,
        prune: bool = False,
        dry_run: bool = False,
        note: str = "",
        label: str = "apply",
    ) -> ApplyPlan:
        """Make the API jobs equal a job-file ``document`` (``label`` names it in messages)."""
        return await self.ops.apply(document, label=label, prune=prune, dry_run=dry_run, note=note)

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self._own_app:
            self.app.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Client(TaskClient):
    """:class:`shared.client.Client` plus the job operations, blocking (each call runs on the
    client's own event loop thread; safe to call from several threads)."""

    def __init__(self, settings: AppSettings, app: Celery | None = None, *, by: str | None = None) -> None:
        super().__init__(settings, app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chronoq-client", daemon=True)
        self._thread.start()
        self.jobs = self._run(self._make(settings, by))

    async def _make(self, settings: AppSettings, by: str | None) -> AsyncClient:
        return AsyncClient(settings, self.app, by=by)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async def call() -> T:
            return await method(*args, **kwargs)

        return self._run(call())

    def create(self, spec: dict[str, Any] | JobSpec, *, note: str = "") -> JobRecord:
        """Store a new API job; raises JobSpecError, OwnershipError."""
        return self._call(self.jobs.create, spec, note=note)

    def update(
        self,
        job_id: str,
        changes: dict[str, Any] | None = None,
        *,
        spec: dict[str, Any] | JobSpec | None = None,
        expected_version: int | None = None,
        note: str = "",
    ) -> JobRecord:
        """Change an API job; raises VersionConflictError when ``expected_version`` is stale."""
        return self._call(self.jobs.update, job_id, changes, spec=spec, expected_version=expected_version, note=note)

    def delete(self, job_id: str, *, expected_version: int | None = None, note: str = "") -> JobRecord:
        return self._call(self.jobs.delete, job_id, expected_version=expected_version, note=note)

    def get(self, job_id: str) -> JobRecord:
        return self._call(self.jobs.get, job_id)

    def list(
        self,
        *,
        source: Source | None = None,
        paused: bool | None = None,
        prefix: str = "",
        query: str = "",
        queue: str | None = None,
        outcome: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> JobPage:
        return self._call(self.jobs.list, source=source, paused=paused, prefix=prefix, query=query, queue=queue,
                          outcome=outcome, offset=offset, limit=limit)  # fmt: skip

    def pause(self, job_id: str, *, note: str = "") -> JobRecord:
        return self._call(self.jobs.pause, job_id, note=note)

    def resume(self, job_id: str, *, note: str = "") -> JobRecord:
        return self._call(self.jobs.resume, job_id, note=note)

    def trigger(self, job_id: str, *, force: bool = False, note: str = "") -> TriggerResult:
        return self._call(self.jobs.trigger, job_id, force=force, note=note)

    def backfill(
        self,
        job_id: str,
        start: datetime,
        end: datetime,
        *,
        overlap: Literal["allow", "sequential"] = "allow",
        note: str = "",
    ) -> BackfillResult:
        return self._call(self.jobs.backfill, job_id, start, end, overlap=overlap, note=note)

    def export(self) -> dict[str, Any]:
        return self._call(self.jobs.export)

    def apply(
        self,
        document: dict[str, Any],
        *,
        prune: bool = False,
        dry_run: bool = False,
        note: str = "",
        label: str = "apply",
    ) -> ApplyPlan:
        return self._call(self.jobs.apply, document, prune=prune, dry_run=dry_run, note=note, label=label)

    def __enter__(self) -> Client:
        return self

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.jobs.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
        super().close()
