"""The console's pages: server-rendered (Jinja2) and usable without JavaScript; htmx (shipped
in ``static/``) refreshes the live parts every few seconds while the tab is visible.

Every form posts a CSRF token (:mod:`scheduler.web.security`) and goes through the same
operations as the API. A refused action renders the page again with the error and its status
(422, 404, 409, 403, 503); a done one redirects back (303) with a message.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from scheduler.bounds import MAX_REQUEST_BYTES, safe_repr
from scheduler.jobfiles import parse_document, parse_json_document
from scheduler.jobstore import JobRecord
from scheduler.views import OUTCOMES
from scheduler.web.api_v1 import API_DOCS, OPENAPI, job_rows
from scheduler.web.apidocs import models, operations
from scheduler.web.charts import runs_chart, timeline_chart
from scheduler.web.console import TIMELINE_MAX_FIRES, Console, error_status, histogram
from scheduler.web.security import CSRF_COOKIE, CSRF_FIELD, Guard, User
from shared.errors import JobSpecError

T = TypeVar("T")
PAGE_SIZE = 50
TEMPLATES = Path(__file__).parent / "templates"
_ACTIONS = ("pause", "resume", "trigger", "delete", "backfill", "edit")


def router(console: Console, guard: Guard) -> APIRouter:
    templates = Jinja2Templates(directory=TEMPLATES)
    templates.env.filters["todt"] = datetime.fromisoformat
    pages = APIRouter(include_in_schema=False)

    def render(request: Request, user: User, name: str, status_code: int = 200, **context: Any) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        token = cookie if cookie and guard.token_valid(cookie) else guard.new_token()
        base = request.scope.get("root_path", "")
        context = {"base": base, "csrf": token, "csrf_field": CSRF_FIELD, "user": user, "poll_s": guard.web.poll_s,
                   "read_only": guard.web.read_only, "done": request.query_params.get("done", ""), **context}  # fmt: skip
        response = templates.TemplateResponse(request, name, context, status_code=status_code)
        if token != cookie:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path=base or "/")
        response.headers["Vary"] = "HX-Request, HX-Target"  # a fragment and its page share a URL
        if partial(request) and status_code == 200:
            return _unchanged_or(request, response)
        return response

    async def region(
        request: Request, key: Hashable, name: str, read: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Response:
        """A live region's poll (htmx) whose HTML depends on nothing but its data (no form, no
        user): read and rendered once per LIVE_TTL_S for every tab (Console.live)."""
        base = request.scope.get("root_path", "")

        async def build() -> bytes:
            context = {"base": base, "poll_s": guard.web.poll_s, "read_only": guard.web.read_only, **await read()}
            return templates.env.get_template(name).render(context).encode()

        body = await console.live(("html", name, key, base), build)
        return _unchanged_or(request, HTMLResponse(body, headers={"Vary": "HX-Request, HX-Target"}))

    async def fetch(request: Request, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """A live region's poll shares ``read`` with every tab (Console.live); a page load reads."""
        return await console.live(key, read) if partial(request) else await read()

    def partial(request: Request) -> bool:
        return request.headers.get("hx-request") == "true" and request.headers.get("hx-target") is not None

    async def failed(request: Request, user: User, exc: Exception, page: str = "error.html", **ctx: Any) -> Response:
        found = error_status(exc)
        if found is None:
            raise exc
        status_code, lines = found
        return render(request, user, page, status_code=status_code, errors=lines, **ctx)

    @pages.get("/", response_class=HTMLResponse)
    async def overview(request: Request) -> Response:
        user = guard.user(request)

        async def read() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            operator = await console.operator()
            return await operator.status(), await operator.control.audit(None, limit=10)

        try:
            status, audit = await fetch(request, "overview", read)
        except Exception as exc:
            return await failed(request, user, exc, title="Overview")
        name = "overview_live.html" if partial(request) else "overview.html"
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        rates = _rates(request.query_params.get("prev", ""), now_ms, status["counters"])
        return render(request, user, name, title="Overview", status=status, audit=audit, stamp=_ms_time,
                      rates=rates, prev=json.dumps({"at_ms": now_ms, "counters": status["counters"]}))  # fmt: skip

    @pages.get("/jobs", response_class=HTMLResponse)
    async def jobs(request: Request) -> Response:
        user = guard.user(request)
        params = request.query_params
        search = params.get("q", "").strip()
        filters: dict[str, Any] = {
            "source": params.get("source") or None,
            "queue": params.get("queue") or None,
            "paused": {"yes": True, "no": False}.get(params.get("paused", "")),
            "outcome": params.get("outcome") if params.get("outcome") in OUTCOMES else None,
        }
        page = max(1, _int(params.get("page"), 1))
        if filters["source"] not in (None, "api", "file", "code"):
            filters["source"] = None
        query = {k: v for k, v in params.items() if k != "page" and v}

        async def read() -> dict[str, Any]:
            rows = await job_rows(console, user, search, **filters, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
            pages_total = max(1, -(-rows["total"] // PAGE_SIZE))
            links = {
                "prev": urlencode({**query, "page": page - 1}) if page > 1 else None,
                "next": urlencode({**query, "page": page + 1}) if page < pages_total else None,
            }
            return {"rows": rows, "page": page, "pages_total": pages_total, "links": links, "query": urlencode(query)}

        try:
            if partial(request):
                return await region(request, (urlencode(query), page), "jobs_table.html", read)
            context = await read()
        except Exception as exc:
            return await failed(request, user, exc, title="Jobs")
        return render(request, user, "jobs.html", title="Jobs", filters=params, outcomes=OUTCOMES, **context)

    @pages.get(API_DOCS, response_class=HTMLResponse)
    async def api_docs(request: Request) -> Response:
        user = guard.user(request)
        schema = request.app.openapi()
        return render(request, user, "api_docs.html", title="API", info=schema.get("info", {}), openapi_url=OPENAPI,
                      ops=operations(schema), models=models(schema))  # fmt: skip

    @pages.get("/new", response_class=HTMLResponse)
    async def new_job(request: Request) -> Response:
        user = guard.user(request)
        return render(request, user, "new.html", title="New job", form={})

    @pages.post("/new", response_class=HTMLResponse)
    async def create_job(request: Request) -> Response:
        user = guard.user(request)
        form = await _form(request)
        guard.check_csrf(request, form.get(CSRF_FIELD, ""))
        guard.writable()
        try:
            document = await console.parse(_form_spec, form)
            record = await (await console.ops(user.by)).create(document, note=form.get("note", ""))
        except Exception as exc:
            return await failed(request, user, exc, "new.html", title="New job", form=form)
        return _back(request, record.id, f"created {record.id} (version {record.version})")

    @pages.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job_page(request: Request, job_id: str) -> Response:
        user = guard.user(request)
        try:
            if partial(request):
                return await region(request, job_id, "job_live.html", lambda: _job_context(console, user, job_id))
            context = await _job_context(console, user, job_id)
        except Exception as exc:
            return await failed(request, user, exc, title=job_id)
        return render(request, user, "job.html", title=job_id, **context)

    @pages.post("/jobs/{job_id}/{action}", response_class=HTMLResponse)
    async def act(request: Request, job_id: str, action: str) -> Response:
        user = guard.user(request)
        if action not in _ACTIONS:
            raise HTTPException(404, f"no action {action!r}")
        form = await _form(request)
        guard.check_csrf(request, form.get(CSRF_FIELD, ""))
        preview = action == "backfill" and form.get("preview") == "1"
        if not preview:
            guard.writable()
        note = form.get("note", "").strip()
        try:
            ops = await console.ops(user.by)
            if action in ("pause", "resume") and not note:
                raise JobSpecError(f"job {job_id!r}: note: required to {action} (say why, for the audit trail)")
            if action == "pause":
                await ops.pause(job_id, note)
                done = f"paused {job_id}"
            elif action == "resume":
                await ops.resume(job_id, note)
                done = f"resumed {job_id}"
            elif action == "trigger":
                result = await ops.trigger(job_id, force=form.get("force") == "1", note=note)
                reason = f" ({result.reason})" if result.reason and not result.dispatched else ""
                done = f"triggered {job_id}: {result.outcome}{reason}, task {result.task_id}"
            elif action == "delete":
                await ops.delete(job_id, expected_version=_int(form.get("expected_version"), None), note=note)
                return _redirect(request, "/jobs", f"deleted {job_id}")
            elif action == "edit":
                spec = await console.parse(_parse_spec, form.get("spec", ""), "spec")
                version = _int(form.get("expected_version"), None)
                record = await ops.update(job_id, spec=spec, expected_version=version, note=note)
                done = f"saved {job_id} (version {record.version})"
            else:
                start, end = _when(job_id, form, "start"), _when(job_id, form, "end")
                overlap: Literal["allow", "sequential"] = (
                    "sequential" if form.get("overlap") == "sequential" else "allow"
                )
                result_b = await ops.backfill(job_id, start, end, overlap=overlap, note=note, dry_run=preview)
                if preview:
                    context = await _job_context(console, user, job_id)
                    return render(request, user, "job.html", title=job_id, **context, backfill=result_b, form=form)
                done = f"backfill {job_id}: {len(result_b.dispatched)} dispatched, {len(result_b.queued)} queued"
        except Exception as exc:
            try:
                context = await _job_context(console, user, job_id)
            except Exception:
                context = {}
            page = "job.html" if context else "error.html"
            return await failed(request, user, exc, page, title=job_id, form=form, open_action=action, **context)
        return _back(request, job_id, done)

    @pages.get("/timeline", response_class=HTMLResponse)
    async def timeline(request: Request) -> Response:
        user = guard.user(request)
        minutes = min(24 * 60, max(5, _int(request.query_params.get("minutes"), 60)))

        async def read() -> dict[str, Any]:
            now, fires, stamps = await console.timeline(minutes)
            chart = timeline_chart(histogram(stamps, now, minutes), now, minutes)
            return {"now": now, "fires": fires[:TIMELINE_MAX_FIRES], "total": len(fires), "chart": chart,
                    "minutes": minutes}  # fmt: skip

        try:
            if partial(request):
                return await region(request, minutes, "timeline_live.html", read)
            view = await read()
        except Exception as exc:
            return await failed(request, user, exc, title="Timeline")
        return render(request, user, "timeline.html", title="Timeline", **view)

    return pages


@functools.cache
def _templates() -> Jinja2Templates:
    return Jinja2Templates(directory=TEMPLATES)


def error_page(
    request: Request, status_code: int, lines: list[str], headers: Mapping[str, str] | None = None
) -> Response:
    """The console's error page (the one every refused action shows) for an error raised
    before any page's own handling: an unknown path (404), a method a path does not take
    (405), a body over the limit (413), authentication (401/403), a bug (500)."""
    try:
        title = f"{status_code} {HTTPStatus(status_code).phrase}"
    except ValueError:
        title = str(status_code)
    context = {"base": request.scope.get("root_path", ""), "title": title, "errors": lines, "user": User("", ""),
               "read_only": False, "done": ""}  # fmt: skip
    return _templates().TemplateResponse(request, "error.html", context, status_code=status_code, headers=headers)


async def _job_context(console: Console, user: User, job_id: str) -> dict[str, Any]:
    ops = await console.ops(user.by)
    record: JobRecord = await ops.get(job_id)
    shown = await ops.operator.show(job_id, history=50)
    return {
        "record": record,
        "job": shown,
        "spec_text": json.dumps(record.spec, indent=2),
        "chart": runs_chart(shown["history"]),
        "stamp": _ms_time,
    }


async def _form(request: Request) -> dict[str, str]:
    """A posted form's fields. The request is at most MAX_REQUEST_BYTES (the app's limit); a
    field's own limit is checked where it is used, so the message names the field."""
    return {k: str(v) for k, v in (await request.form(max_part_size=MAX_REQUEST_BYTES)).items()}


def _unchanged_or(request: Request, response: Response) -> Response:
    """A live region's answer with an ETag: a browser revalidating its copy (If-None-Match) of
    an unchanged fragment gets 304 and no body, and htmx gets the copy it already has."""
    etag = '"' + hashlib.blake2b(bytes(response.body), digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "HX-Request, HX-Target"}
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    response.headers.update(headers)
    return response


def _back(request: Request, job_id: str, done: str) -> Response:
    return _redirect(request, f"/jobs/{quote(job_id, safe='')}", done)


def _redirect(request: Request, path: str, done: str) -> Response:
    base = request.scope.get("root_path", "")
    return RedirectResponse(f"{base}{path}?{urlencode({'done': done})}", status_code=303)


def _int(text: str | None, default: Any) -> Any:
    try:
        return int(text) if text not in (None, "") else default
    except ValueError:
        return default


def _ms_time(ms: Any) -> str:
    try:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return "-"


def _when(job_id: str, form: dict[str, str], field: str) -> datetime:
    text = form.get(field, "").strip()
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise JobSpecError(f"job {job_id!r}: backfill {field}: not an ISO time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _parse_spec(text: str, field: str) -> dict[str, Any]:
    """A spec typed as YAML or JSON in the form's ``field``, parsed safely and within the
    document limits (:func:`scheduler.jobfiles.parse_document`); blocking: run it off the loop."""
    document = parse_document(text, field)
    if not isinstance(document, dict):
        raise JobSpecError(f"{field}: must be a mapping with id, task and a trigger")
    return document


def _form_spec(form: dict[str, str]) -> dict[str, Any]:
    """The new-job form as a job-file mapping: the fields, then any extra keys typed as YAML.
    Every problem names the form's field; blocking (parses): run it off the event loop."""
    document = _parse_spec(form["extra"], "Other job keys") if form.get("extra", "").strip() else {}
    for key in ("id", "task", "queue", "description"):
        if form.get(key, "").strip():
            document[key] = form[key].strip()
    job = f"job {safe_repr(document.get('id', '?'))}"
    kind, value = form.get("kind", "cron"), form.get("schedule", "").strip()
    if kind in ("cron", "interval", "date") and value:
        document[kind] = value if kind != "interval" else parse_document(value, f"{job}: {kind}")
    for key in ("args", "kwargs"):
        if form.get(key, "").strip():
            document[key] = parse_json_document(form[key], f"{job}: {key}")
    return document


def _rates(previous: str, now_ms: int, counters: dict[str, int]) -> dict[str, float]:
    """Fires per minute per outcome since the counters the last refresh saw (the page carries
    them: the console keeps no state). Empty on the first load or after a counter reset."""
    try:
        before = json.loads(previous) if previous else {}
        elapsed_min = (now_ms - int(before["at_ms"])) / 60_000
        old = {str(k): int(v) for k, v in before["counters"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    if not 0 < elapsed_min < 10 or any(counters.get(k, 0) < v for k, v in old.items()):
        return {}
    return {k: round((v - old.get(k, 0)) / elapsed_min, 1) for k, v in counters.items()}
