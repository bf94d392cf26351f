"""``/api/v1``: the JSON face of the operations layer (OpenAPI at ``/api/v1/openapi.json`` of the
console, docs at ``/api/v1/docs``).

Every action calls :class:`scheduler.jobops.JobOps` or :class:`scheduler.operator.Operator`,
like ``chronoq`` and :class:`scheduler.api.Client`, so the three give the same answers and the
same messages. Errors are ``{"error": "<first line>", "problems": [...lines]}``: an invalid spec
422 (each line naming job and field), an unknown job 404, a version conflict or a job owned by
a file or code 409, read-only mode 403, Redis down 503; the framework's own errors take the
same shape (the app's handlers): a body not JSON or nested too deep 400, an unknown path 404,
a wrong method 405, a bad parameter 422, a body over the limit 413.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations, and
the dependency aliases are local to :func:`router`.
"""

from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from scheduler.jobfiles import parse_json_document
from scheduler.jobmodels import BackfillResult, TriggerResult
from scheduler.jobstore import JobRecord
from scheduler.views import OUTCOMES
from scheduler.web.console import Console
from scheduler.web.security import Guard, User
from shared.errors import JobSpecError


class NewJob(BaseModel):
    spec: dict[str, Any] = Field(description="the job as job-file keys: id, task, one of cron/interval/date, options")
    note: str = ""


class JobChange(BaseModel):
    changes: dict[str, Any] | None = Field(None, description="job-file keys to change (a new trigger replaces the old)")
    spec: dict[str, Any] | None = Field(None, description="or the whole new spec")
    expected_version: int | None = Field(None, description="refuse (409) if the job changed since this version")
    note: str = ""


class Note(BaseModel):
    note: str = ""


class TriggerRequest(BaseModel):
    force: bool = False
    note: str = ""


class BackfillRequest(BaseModel):
    start: datetime
    end: datetime
    overlap: Literal["allow", "sequential"] = "allow"
    note: str = ""
    dry_run: bool = Field(False, description="preview: the fires it would send; nothing is sent")


OPENAPI = "/api/v1/openapi.json"
API_DOCS = "/api/v1/docs"
"""The API's reference page (:mod:`scheduler.web.apidocs`, rendered by the pages' router)."""


class BodyRequest(Request):
    """A request whose JSON body is parsed in a worker thread within the document limits
    (size, depth): a hostile body is a 400 naming it, and never stalls the event loop."""

    async def json(self) -> Any:
        body = await self.body()
        console: Console = self.app.state.console
        try:
            return await console.parse(parse_json_document, body, "body")
        except JobSpecError as exc:
            raise HTTPException(400, str(exc)) from None


class BodyRoute(APIRoute):
    """The API's routes: their body is read by :class:`BodyRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BodyRequest(request.scope, request.receive))

        return bounded


def router(console: Console, guard: Guard) -> APIRouter:
    def user(request: Request) -> User:
        return guard.user(request)

    def writer(request: Request) -> User:
        found = guard.user(request)
        guard.writable()
        return found

    Reader = Annotated[User, Depends(user)]
    Writer = Annotated[User, Depends(writer)]
    api = APIRouter(prefix="/api/v1", route_class=BodyRoute)

    @api.get(OPENAPI.removeprefix("/api/v1"), include_in_schema=False)
    async def openapi(request: Request, _: Reader) -> dict[str, Any]:
        # Behind the console's authentication like every other answer (FastAPI's own is open).
        schema: dict[str, Any] = request.app.openapi()
        return schema

    @api.get("/status", summary="replicas, leader, queues, workers, outcome counters (as `chronoq status`)")
    async def status(_: Reader) -> dict[str, Any]:
        return await (await console.operator()).status()

    @api.get("/replicas")
    async def replicas(_: Reader) -> dict[str, Any]:
        found = await (await console.operator()).status()
        return {"leader": found["leader"], "replicas": found["replicas"]}

    @api.get("/workers")
    async def workers(_: Reader) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = (await (await console.operator()).status())["workers"]
        return workers

    @api.get("/jobs", summary="a page of jobs with next fire and last outcome (search, source, queue, paused, outcome)")
    async def jobs(
        who: Reader,
        q: str = Query("", description="a case-insensitive part of the id or the task"),
        source: Literal["api", "file", "code"] | None = None,
        queue: str | None = None,
        paused: bool | None = None,
        outcome: str | None = Query(None, description=f"the last fire's outcome: {', '.join(OUTCOMES)} (no fire yet)"),
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        return await job_rows(console, who, q, source=source, queue=queue, paused=paused, outcome=outcome,
                              offset=offset, limit=limit)  # fmt: skip

    @api.get("/jobs/{job_id}", summary="a job: record, spec, next fires, history, counters, audit (as `jobs show`)")
    async def show(job_id: str, who: Reader, history: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        ops = await console.ops(who.by)
        record = await ops.get(job_id)
        return {"record": record.model_dump(), **await ops.operator.show(job_id, history=history)}

    @api.post("/jobs", status_code=201, summary="create an API job (as `chronoq jobs add`)")
    async def create(body: NewJob, who: Writer) -> JobRecord:
        return await (await console.ops(who.by)).create(body.spec, note=body.note)

    @api.patch("/jobs/{job_id}", summary="change an API job (as `chronoq jobs edit`)")
    async def update(job_id: str, body: JobChange, who: Writer) -> JobRecord:
        ops = await console.ops(who.by)
        return await ops.update(
            job_id, body.changes, spec=body.spec, expected_version=body.expected_version, note=body.note
        )

    @api.delete("/jobs/{job_id}", summary="delete an API job (as `chronoq jobs delete`)")
    async def delete(job_id: str, who: Writer, expected_version: int | None = None, note: str = "") -> JobRecord:
        return await (await console.ops(who.by)).delete(job_id, expected_version=expected_version, note=note)

    @api.post("/jobs/{job_id}/pause")
    async def pause(job_id: str, body: Note, who: Writer) -> JobRecord:
        return await (await console.ops(who.by)).pause(job_id, body.note)

    @api.post("/jobs/{job_id}/resume")
    async def resume(job_id: str, body: Note, who: Writer) -> JobRecord:
        return await (await console.ops(who.by)).resume(job_id, body.note)

    @api.post("/jobs/{job_id}/trigger", summary="run it now, once (force: ignore the overlap policy)")
    async def trigger(job_id: str, body: TriggerRequest, who: Writer) -> TriggerResult:
        return await (await console.ops(who.by)).trigger(job_id, force=body.force, note=body.note)

    @api.post("/jobs/{job_id}/backfill", summary="send the undecided fires of a past range (dry_run: preview)")
    async def backfill(job_id: str, body: BackfillRequest, request: Request) -> BackfillResult:
        who = guard.user(request)
        if not body.dry_run:
            guard.writable()
        return await (await console.ops(who.by)).backfill(
            job_id, body.start, body.end, overlap=body.overlap, note=body.note, dry_run=body.dry_run
        )

    @api.get("/jobs/{job_id}/history", summary="a job's last fires, newest first")
    async def history(job_id: str, _: Reader, limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        return await (await console.operator()).state.history(job_id, limit)

    @api.get("/outcomes", summary="fires per outcome, overall or of one job")
    async def outcomes(_: Reader, job: str | None = None) -> dict[str, int]:
        return await (await console.operator()).state.counters(job)

    @api.get("/audit", summary="the audit trail, newest first, of every job or one")
    async def audit(_: Reader, job: str | None = None, limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        return await (await console.operator()).control.audit(job, limit=limit)

    @api.get("/timeline", summary="the fires of the next minutes across every job")
    async def timeline(_: Reader, minutes: float = Query(60, gt=0, le=24 * 60)) -> list[dict[str, Any]]:
        return (await console.timeline(minutes))[1]

    return api


async def job_rows(console: Console, who: User, q: str = "", **filters: Any) -> dict[str, Any]:
    """A page of jobs (:meth:`JobOps.list`) with each row's :meth:`Operator.summaries` fields."""
    ops = await console.ops(who.by)
    page = await ops.list(query=q, **filters)
    summaries = {row["id"]: row for row in await ops.operator.summaries([r.id for r in page.items])}
    items = [{**record.model_dump(), **summaries.get(record.id, {})} for record in page.items]
    return {"items": items, "total": page.total, "offset": page.offset, "limit": page.limit}
