"""The console closed by default, over real HTTP against real Redis: authentication (401 / 403),
read-only mode, CSRF refusals on the forms, no secret rendered, Redis down answered with 503
(and back once Redis is), the refused binds (exit 78, one line), and the app mounted into a
FastAPI app."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Mount

from scheduler.web import create_app
from scheduler.web.api_v1 import router as api_router
from scheduler.web.console import Console
from scheduler.web.pages import router as pages_router
from scheduler.web.security import CONTENT_SECURITY_POLICY, Guard
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import ROOT, RedisServer, free_port, make_settings, settings_env, wait_for
from tests.faults.harness import RedisProcess
from tests.web.conftest import ConsoleProcess

pytestmark = pytest.mark.timeout(120)

TOKEN = "tok-3f9a1c7e5b2d"
PASSWORD = "pw-8c1e4a9f0b6d"
SPEC = {"id": "nightly", "task": "demo.sleep", "cron": "0 2 * * *"}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has a form with a CSRF token"
    return found.group(1)


def test_token_and_basic_auth(settings: AppSettings, start_console: Any) -> None:
    env = {"WEB_TOKEN": TOKEN, "WEB_USERNAME": "ops", "WEB_PASSWORD": PASSWORD}
    console: ConsoleProcess = start_console(settings, extra_env=env)
    with console.http() as http:
        missing = http.get("/api/v1/status")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
        assert http.get("/api/v1/status", headers={"Authorization": "Bearer wrong"}).status_code == 403
        ok = http.get("/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        assert http.get("/", auth=("ops", "nope")).status_code == 401
        assert http.get("/jobs").status_code == 401
        health = http.get("/healthz")  # the probes' route: no credentials, nothing revealed
        assert (health.status_code, health.text) == (200, "ok\n")
        page = http.get("/", auth=("ops", PASSWORD))
        assert page.status_code == 200 and "ops" in page.text
        assert http.get("/jobs", auth=("anyone", TOKEN)).status_code == 200, "the token is a page password too"
        created = http.post("/api/v1/jobs", json={"spec": SPEC}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert created.status_code == 201 and created.json()["created_by"] == "web:token@127.0.0.1"
        shown = http.get("/jobs/nightly", auth=("ops", PASSWORD)).text
        for body in (page.text, shown, ok.text, http.get("/api/v1/openapi.json").text, console.log()):
            assert TOKEN not in body and PASSWORD not in body


def test_read_only_refuses_every_change(settings: AppSettings, redis_server: RedisServer, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings, extra_env={"WEB_READ_ONLY": "true"})
    keys = RedisKeys(settings.redis.key_prefix)
    with console.http() as http:
        refused = http.post("/api/v1/jobs", json={"spec": SPEC})
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]
        page = http.get("/new")
        refused_form = http.post("/new", data={"csrf": csrf_of(page.text), **SPEC, "kind": "cron"})
        assert refused_form.status_code == 403
        assert "New job" not in http.get("/jobs").text.split("<main", 1)[1]
    with redis_server.client() as r:
        assert r.hgetall(keys.api_jobs) == {}


def test_forms_refuse_missing_wrong_and_cross_origin_csrf_tokens(
    settings: AppSettings, redis_server: RedisServer, start_console: Any
) -> None:
    console: ConsoleProcess = start_console(settings)
    keys = RedisKeys(settings.redis.key_prefix)
    with console.http() as http:
        assert http.post("/api/v1/jobs", json={"spec": SPEC}).status_code == 201
        page = http.get("/jobs/nightly")
        token = csrf_of(page.text)
        assert http.cookies.get("chronoq_csrf") == token
        form = {"note": "maintenance"}
        assert http.post("/jobs/nightly/pause", data=form).status_code == 403, "no token"
        assert http.post("/jobs/nightly/pause", data={**form, "csrf": "x.y"}).status_code == 403, "a forged token"
        with httpx.Client(base_url=console.url) as stranger:  # a token without its cookie
            assert stranger.post("/jobs/nightly/pause", data={**form, "csrf": token}).status_code == 403
        evil = http.post("/jobs/nightly/pause", data={**form, "csrf": token}, headers={"Origin": "http://evil.test"})
        assert evil.status_code == 403
        with redis_server.client() as r:
            assert r.hget(keys.paused, "nightly") is None, "nothing changed by a refused form"
        no_note = http.post("/jobs/nightly/pause", data={"csrf": token, "note": " "})
        assert no_note.status_code == 422 and "note: required" in no_note.text
        done = http.post("/jobs/nightly/pause", data={**form, "csrf": token})
        assert done.status_code == 303 and done.headers["location"].startswith("/jobs/nightly?done=")
        with redis_server.client() as r:
            assert r.hget(keys.paused, "nightly") is not None


def test_redis_down_is_a_503_page_and_the_console_recovers(tmp_path: Path, namespace: str, start_console: Any) -> None:
    server = RedisProcess(tmp_path / "redis").start()
    try:
        settings = make_settings(server.url, namespace, redis={"socket_timeout_s": 1, "socket_connect_timeout_s": 1})
        console: ConsoleProcess = start_console(settings)
        with console.http() as http:
            assert http.get("/").status_code == 200
            server.stop()
            page = http.get("/")
            assert page.status_code == 503 and "redis unavailable" in page.text.lower()
            api = http.get("/api/v1/jobs")
            assert api.status_code == 503 and "redis" in api.json()["error"].lower()
            assert console.process.poll() is None, "the console runs on"
            server.start()
            wait_for(lambda: http.get("/").status_code == 200, 30, "the console to answer again")
            assert "Traceback" not in console.log()
    finally:
        server.stop()


def test_refuses_a_public_bind_without_auth_and_a_port_in_use(settings: AppSettings) -> None:
    def web(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", "web", *args],
            cwd=ROOT,
            env={**settings_env(settings), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    public = web("--host", "0.0.0.0", "--port", str(free_port()))
    assert public.returncode == 78
    assert public.stderr.strip().splitlines() == [
        "chronoq cli: WEB_HOST: refusing to listen on 0.0.0.0 without authentication: set WEB_TOKEN or "
        "WEB_USERNAME and WEB_PASSWORD, or bind 127.0.0.1"
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = web("--port", str(port))
    assert busy.returncode == 78
    assert busy.stderr.strip().splitlines() == [
        f"chronoq cli: WEB_PORT: 127.0.0.1:{port} is already in use; choose another with --port or WEB_PORT"
    ]
    bad = web("--port", "70000")
    assert bad.returncode == 78 and "WEB_PORT" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture
def mounted(settings: AppSettings) -> Iterator[str]:
    """The console mounted at /chronoq in a FastAPI app, served by uvicorn in a thread."""
    console_app = create_app(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await console_app.state.console.aclose()

    host = FastAPI(lifespan=lifespan)

    @host.get("/")
    async def home() -> dict[str, str]:
        return {"app": "the host app"}

    host.mount("/chronoq", console_app)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(host, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, "uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


def test_mounted_into_a_fastapi_app(mounted: str, redis_server: RedisServer, settings: AppSettings) -> None:
    keys = RedisKeys(settings.redis.key_prefix)
    with httpx.Client(base_url=mounted, timeout=30) as http:
        assert http.get("/").json() == {"app": "the host app"}
        assert http.post("/chronoq/api/v1/jobs", json={"spec": SPEC}).status_code == 201
        page = http.get("/chronoq/jobs/nightly")
        assert page.status_code == 200
        assert 'href="/chronoq/static/console.css"' in page.text and 'href="/chronoq/jobs"' in page.text
        assert http.get("/chronoq/static/htmx.min.js").status_code == 200
        listed = http.get("/chronoq/api/v1/jobs").json()
        assert [j["id"] for j in listed["items"]] == ["nightly"]
        done = http.post("/chronoq/jobs/nightly/pause", data={"csrf": csrf_of(page.text), "note": "mounted"})
        assert done.status_code == 303 and done.headers["location"].startswith("/chronoq/jobs/nightly?")
    with redis_server.client() as r:
        assert r.hget(keys.paused, "nightly") is not None


def every_request(settings: AppSettings) -> list[tuple[str, str]]:
    """(method, path) of every route of the app and of its API and pages routers, path
    parameters filled in, and a static file."""
    console, guard = Console(settings), Guard(settings.web)
    routes = [*create_app(settings).routes, *api_router(console, guard).routes, *pages_router(console, guard).routes]
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            path = route.path.replace("{job_id}", "nightly").replace("{action}", "pause")
            found += [(method, path) for method in sorted(route.methods or ())]
        elif isinstance(route, Mount):
            found.append(("GET", f"{route.path}/console.css"))
    return found


def test_every_answer_carries_the_security_headers_and_no_server_header(
    settings: AppSettings, start_console: Any
) -> None:
    console: ConsoleProcess = start_console(settings, extra_env={"WEB_TOKEN": TOKEN})
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    requests = every_request(settings)
    assert {("GET", "/"), ("GET", "/api/v1/docs"), ("GET", "/api/v1/openapi.json"), ("GET", "/favicon.ico"),
            ("POST", "/jobs/nightly/pause"), ("DELETE", "/api/v1/jobs/nightly")} <= set(requests)  # fmt: skip
    with console.http() as http:
        assert http.post("/api/v1/jobs", json={"spec": SPEC}, headers=bearer).status_code == 201
        statuses = set()
        for (method, path), headers in [(r, h) for r in requests for h in (bearer, {})] + [
            (("GET", "/nope"), bearer),
            (("GET", "/static/nope.js"), {}),
            (("GET", "/api/v1/jobs/absent"), bearer),
            (("PUT", "/api/v1/jobs"), bearer),
        ]:
            answer = http.request(method, path, headers=headers, json={} if method in ("POST", "PATCH") else None)
            statuses.add(answer.status_code)
            what = f"{method} {path} {'with' if headers else 'without'} credentials: {answer.status_code}"
            assert answer.headers.get("content-security-policy") == CONTENT_SECURITY_POLICY, what
            assert (
                "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY and "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
            )
            assert answer.headers.get("x-frame-options") == "DENY", what
            assert answer.headers.get("x-content-type-options") == "nosniff", what
            assert answer.headers.get("referrer-policy") == "same-origin", what
            assert "server" not in answer.headers, what
        assert {200, 401, 403, 404, 405, 422} <= statuses, "answers and errors of every kind were checked"
        # The API's schema and its docs page are behind authentication like everything else.
        for path in ("/api/v1/openapi.json", "/api/v1/docs"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403, path
            assert http.get(path, headers=bearer).status_code == 200, path
        schema = http.get("/api/v1/openapi.json", headers=bearer).json()
        assert "/api/v1/jobs/{job_id}/backfill" in schema["paths"]
        docs = http.get("/api/v1/docs", headers=bearer).text
        assert "<script>" not in docs and "cdn" not in docs.lower() and "fastapi.tiangolo.com" not in docs
        assert "/api/v1/jobs/{job_id}/backfill" in docs and "BackfillRequest" in docs
        icon = http.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
