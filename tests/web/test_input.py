"""Hostile input to the console and the API over real HTTP (a ``chronoq web`` process under
uvicorn, real Redis): documents nested too deep are a 4xx naming the field, a huge document is
refused without stalling the event loop, and every error of every path has one shape."""

from __future__ import annotations

import html
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from scheduler.bounds import MAX_DOCUMENT_NODES, MAX_REQUEST_BYTES
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import RedisServer
from tests.web.conftest import ConsoleProcess
from tests.web.test_security import csrf_of

pytestmark = pytest.mark.timeout(120)

SPEC = {"id": "nightly", "task": "demo.sleep", "cron": "0 2 * * *"}
NEW = {"id": "deep", "task": "demo.sleep", "kind": "cron", "schedule": "0 2 * * *"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def shown(response: httpx.Response) -> str:
    return html.unescape(response.text)


def test_deep_form_input_is_a_422_naming_the_field_and_changes_nothing(
    settings: AppSettings, redis_server: RedisServer, start_console: Any
) -> None:
    console: ConsoleProcess = start_console(settings)
    keys = RedisKeys(settings.redis.key_prefix)
    with console.http() as http:
        token = csrf_of(http.get("/new").text)
        args = http.post("/new", data={"csrf": token, **NEW, "args": nested(1000)})
        assert args.status_code == 422, args.text[-500:]
        assert "job 'deep': args: nested more than 100 levels deep" in shown(args)
        extra = http.post("/new", data={"csrf": token, **NEW, "extra": "args: " + nested(600)})
        assert extra.status_code == 422, extra.text[-500:]
        assert "Other job keys: refused: nested too deeply" in shown(extra)
        assert http.post("/api/v1/jobs", json={"spec": SPEC}).status_code == 201
        with redis_server.client() as r:
            before = r.hgetall(keys.api_jobs)
        token = csrf_of(http.get("/jobs/nightly").text)
        for spec in (nested(600), "{" * 1000 + "}" * 1000, "id: nightly\nargs: " + nested(1000)):
            edit = http.post("/jobs/nightly/edit", data={"csrf": token, "spec": spec, "expected_version": "1"})
            assert edit.status_code == 422, edit.text[-500:]
            assert "spec: refused: nested too deeply" in shown(edit)
        pause = http.post("/jobs/nightly/pause", data={"csrf": token, "note": "n" * 1001})
        assert pause.status_code == 422 and "job 'nightly': note: 1001 characters; the limit is 1000" in shown(pause)
    with redis_server.client() as r:
        assert r.hgetall(keys.api_jobs) == before and set(before) == {"nightly"} and r.hlen(keys.paused) == 0
    assert "Traceback" not in console.log()


def test_a_huge_yaml_post_is_refused_while_healthz_keeps_answering(settings: AppSettings, start_console: Any) -> None:
    """The issue's document (250,000 items, 1 MB as posted) in "Other job keys" blocked the
    event loop for seconds. Posted with four big valid ones (20,000 items each, parsed in worker
    threads) while /healthz is asked over and over: each answer within 1 s (a probe's
    timeout), and some of them while the posts are still being processed."""
    console: ConsoleProcess = start_console(settings)
    huge = "args: [" + ",".join(["0"] * 250_000) + "]"  # 1 MB URL-encoded: within Starlette's field limit
    big = "args:\n" + "- 0\n" * 20_000
    probes: list[tuple[float, str]] = []  # (answered at, outcome)
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=console.url, timeout=1.0) as health:
            while not done.is_set():
                try:
                    answer = health.get("/healthz")
                    probes.append((time.monotonic(), str(answer.status_code)))
                except httpx.HTTPError as exc:
                    probes.append((time.monotonic(), f"{type(exc).__name__}"))

    with console.http() as http:
        token = csrf_of(http.get("/new").text)
        forms = [{"csrf": token, **NEW, "id": "huge", "extra": huge}]
        forms += [{"csrf": token, **NEW, "id": f"big-{i}", "extra": big} for i in range(4)]
        prober = threading.Thread(target=probe)
        prober.start()
        try:
            with ThreadPoolExecutor(len(forms)) as pool:
                answers = list(pool.map(lambda form: (http.post("/new", data=form), time.monotonic()), forms))
        finally:
            done.set()
            prober.join()
    assert probes and all(outcome == "200" for _, outcome in probes), [o for _, o in probes if o != "200"][:3]
    last_post = max(at for _, at in answers)
    assert any(at < last_post for at, _ in probes), "no /healthz answered while the posts were processed"
    (refused, _), *created = answers
    assert refused.status_code == 422, refused.text[-500:]
    assert f"Other job keys: 249999 lines and commas; the limit is {MAX_DOCUMENT_NODES} values" in shown(refused)
    assert [answer.status_code for answer, _ in created] == [303] * 4, [a.text[-300:] for a, _ in created]


def test_every_error_has_the_documented_shape(settings: AppSettings, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    json_type = {"content-type": "application/json"}
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    with console.http() as http:
        answers = {
            "deep body": http.post("/api/v1/jobs", content='{"spec": ' + nested(1000) + "}", headers=json_type),
            "bad json": http.post("/api/v1/jobs", content="{", headers=json_type),
            "too big": http.post("/api/v1/jobs", content=b" " * (MAX_REQUEST_BYTES + 1), headers=json_type),
            "no route": http.get("/api/v1/nope"),
            "no method": http.put("/api/v1/jobs"),
            "invalid": http.get("/api/v1/jobs", params={"limit": 0}),
            "no spec": http.post("/api/v1/jobs", json={"spec": 1}),
            "long text": http.post(
                "/api/v1/jobs", json={"spec": {**SPEC, "description": "d" * 4001}, "note": "n" * 1001}
            ),
        }
        statuses = {name: answer.status_code for name, answer in answers.items()}
        assert statuses == {"deep body": 400, "bad json": 400, "too big": 413, "no route": 404, "no method": 405,
                            "invalid": 422, "no spec": 422, "long text": 422}  # fmt: skip
        for name, answer in answers.items():
            body = answer.json()
            assert set(body) == {"error", "problems"} and body["error"] == body["problems"][0], (name, body)
        assert answers["deep body"].json()["error"] == "body: nested more than 100 levels deep"
        assert answers["no route"].json()["error"] == "not found: GET /api/v1/nope"
        assert answers["no method"].json()["error"] == "method not allowed: PUT /api/v1/jobs"
        assert answers["long text"].json()["problems"] == [
            "job 'nightly': description: 4001 characters; the limit is 4000"
        ]
        assert answers["invalid"].json()["problems"] == ["query.limit: Input should be greater than or equal to 1"]
        pages = {
            404: http.get("/nope"),
            405: http.put("/new"),
            413: http.post("/new", content=b"x" * (MAX_REQUEST_BYTES + 1), headers=form_type),
        }
        for status, page in pages.items():
            assert page.status_code == status and page.headers["content-type"].startswith("text/html"), page.text
            assert f"<h1>{status} " in page.text and 'role="alert"' in page.text
    assert "Traceback" not in console.log()
