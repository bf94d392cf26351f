"""The jobs list over real HTTP (``chronoq web`` processes against a real redis-server, a real
Celery worker and, where file jobs are needed, a real scheduler): the last-outcome filter
agrees with the history, the CLI and the Python client, with paging; two console processes
never show a job list older than the last write made through the other; an unchanged live
region is a 304; every valid job id has a page and API routes."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from scheduler.api import Client
from scheduler.web.console import LIVE_TTL_S, TIMELINE_TTL_S
from shared.settings import AppSettings
from tests.conftest import SchedulerProcess, chronoq, wait_for, write_jobs
from tests.web.conftest import ConsoleProcess

pytestmark = pytest.mark.timeout(150)

HX = {"HX-Request": "true", "HX-Target": "job-live"}
DAILY = {"cron": "0 3 * * *"}


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


def page_ids(html: str) -> list[str]:
    return re.findall(r'class="jobid" href="[^"]*">([^<]+)</a>', html)


def test_last_outcome_filter_agrees_with_the_history_cli_and_client(
    settings: AppSettings, start_console: Any, start_worker: Any, namespace: str
) -> None:
    console: ConsoleProcess = start_console(settings)
    jobs = {
        "ok-1": {"task": "demo.number_sum", "args": [1, 2]},
        "ok-2": {"task": "demo.number_sum", "args": [3, 4]},
        "bad-1": {"task": "demo.number_sum", "args": ["one", 2]},  # TypeError: failed
        "queued-1": {"task": "demo.sleep", "args": [0], "queue": f"nobody_{namespace}"},  # no worker: dispatched
        "twice-1": {"task": "demo.sleep", "args": [0], "queue": f"nobody_{namespace}"},  # second trigger: skipped
        "idle-1": {"task": "demo.sleep", "args": [0]},
        "idle-2": {"task": "demo.sleep", "args": [0]},
        "idle-3": {"task": "demo.sleep", "args": [0]},
    }
    with console.http() as http:
        for job_id, fields in jobs.items():
            created = http.post("/api/v1/jobs", json={"spec": {"id": job_id, **DAILY, **fields}})
            assert created.status_code == 201, created.text
        assert http.get("/api/v1/jobs", params={"outcome": "never"}).json()["total"] == len(jobs)

        start_worker(settings)
        for job_id in ("ok-1", "ok-2", "bad-1", "queued-1", "twice-1", "twice-1"):
            assert http.post(f"/api/v1/jobs/{job_id}/trigger", json={}).status_code == 200

        def finals() -> dict[str, str] | None:
            found = {}
            for job_id in jobs:
                history = http.get(f"/api/v1/jobs/{job_id}/history", params={"limit": 1}).json()
                found[job_id] = history[0]["final"] if history else "never"
            done = all(found[j] in ("succeeded", "failed") for j in ("ok-1", "ok-2", "bad-1"))
            return found if done else None

        truth = wait_for(finals, 60, "the triggered fires to finish on the worker")
        assert truth["bad-1"] == "failed" and truth["queued-1"] == "dispatched" and truth["twice-1"] == "skipped"
        expected = {o: sorted(j for j, f in truth.items() if f == o) for o in set(truth.values())}
        assert set(expected) == {"succeeded", "failed", "dispatched", "skipped", "never"}

        # The filter reads outcomes at most OUTCOME_TTL_S old: wait for it once, then all faces agree.
        wait_for(lambda: ids(http.get("/api/v1/jobs", params={"outcome": "succeeded"}).json()) == expected["succeeded"],
                 30, "the outcome filter to see the runs")  # fmt: skip
        with Client(settings) as client:
            for outcome, wanted in expected.items():
                assert ids(http.get("/api/v1/jobs", params={"outcome": outcome}).json()) == wanted, outcome
                cli = json.loads(chronoq(settings, "jobs", "list", "--outcome", outcome, "--json").stdout)
                assert [row["id"] for row in cli] == wanted, outcome
                assert [r.id for r in client.list(outcome=outcome).items] == wanted, outcome
                html = http.get("/jobs", params={"outcome": outcome}).text
                assert page_ids(html) == wanted and f'value="{outcome}" selected' in html, outcome
        assert ids(http.get("/api/v1/jobs", params={"outcome": "running"}).json()) == []

        # Paging over a filtered list, and the filter with search and the others.
        first = http.get("/api/v1/jobs", params={"outcome": "never", "limit": 2}).json()
        rest = http.get("/api/v1/jobs", params={"outcome": "never", "limit": 2, "offset": 2}).json()
        assert first["total"] == rest["total"] == 3 and ids(first) + ids(rest) == expected["never"]
        assert len(ids(first)) == 2
        both = http.get("/api/v1/jobs", params={"outcome": "succeeded", "q": "OK-2", "source": "api"}).json()
        assert ids(both) == ["ok-2"]
        pages = http.get("/jobs", params={"outcome": "never", "page": 1}).text
        assert "3 jobs" in pages

        wrong = http.get("/api/v1/jobs", params={"outcome": "bogus"})
        assert wrong.status_code == 422 and "outcome: 'bogus' is not one of" in wrong.json()["error"]
    refused = chronoq(settings, "jobs", "list", "--outcome", "bogus", check=False)
    assert refused.returncode == 2 and "invalid choice: 'bogus'" in refused.stderr


def test_two_consoles_never_show_a_list_older_than_the_last_write(
    settings: AppSettings, start_console: Any, start_scheduler: Any, tmp_path: Path
) -> None:
    file_job = {"id": "file-a", "task": "demo.sleep", "args": [0], **DAILY}
    jobs_file = write_jobs(tmp_path / "jobs.yaml", [file_job])
    replica: SchedulerProcess = start_scheduler(settings, jobs_file)[0]
    first, second = start_console(settings), start_console(settings)
    with first.http() as a, second.http() as b:
        wait_for(lambda: ids(a.get("/api/v1/jobs").json()) == ["file-a"], 30, "the file job in the list")

        # Each write through the other console is in the very next list (no wait, no TTL).
        assert b.post("/api/v1/jobs", json={"spec": {"id": "zz-1", "task": "demo.sleep", **DAILY}}).status_code == 201
        assert ids(a.get("/api/v1/jobs", params={"q": "zz"}).json()) == ["zz-1"]
        edited = b.patch("/api/v1/jobs/zz-1", json={"changes": {"task": "demo.number_sum", "queue": "q-new"}})
        assert edited.status_code == 200
        assert ids(a.get("/api/v1/jobs", params={"q": "number_sum"}).json()) == ["zz-1"]
        assert ids(a.get("/api/v1/jobs", params={"queue": "q-new"}).json()) == ["zz-1"]
        assert b.post("/api/v1/jobs/zz-1/pause", json={"note": "n"}).status_code == 200
        assert ids(a.get("/api/v1/jobs", params={"paused": True}).json()) == ["zz-1"]
        assert b.delete("/api/v1/jobs/zz-1").status_code == 200
        assert a.get("/api/v1/jobs", params={"q": "zz"}).json()["total"] == 0

        # A job file changed and reloaded: once the replica published it (the CLI reads the
        # registry), the console's next search has it.
        write_jobs(jobs_file, [{**file_job, "task": "demo.record_fire"}, {**file_job, "id": "file-b"}])
        replica.process.send_signal(signal.SIGHUP)

        def published() -> bool:
            rows = json.loads(chronoq(settings, "jobs", "list", "--json").stdout)
            return {r["id"]: r["task"] for r in rows} == {"file-a": "demo.record_fire", "file-b": "demo.sleep"}

        wait_for(published, 30, "the reload to be published")
        assert ids(a.get("/api/v1/jobs", params={"q": "record_fire"}).json()) == ["file-a"]
        assert ids(a.get("/api/v1/jobs", params={"source": "file"}).json()) == ["file-a", "file-b"]

        # A live region (an htmx poll) may be shared for LIVE_TTL_S, never longer.
        assert "paused" not in a.get("/jobs/file-b", headers=HX).text
        assert b.post("/api/v1/jobs/file-b/pause", json={"note": "later"}).status_code == 200
        wait_for(lambda: "later" in a.get("/jobs/file-b", headers=HX).text, LIVE_TTL_S + 5, "the pause in the poll")


def test_an_unchanged_live_region_is_a_304(settings: AppSettings, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    with console.http() as http:
        assert http.post("/api/v1/jobs", json={"spec": {"id": "etag-1", "task": "demo.sleep", **DAILY}}).is_success
        fresh = http.get("/jobs/etag-1", headers=HX)
        etag = fresh.headers["etag"]
        assert fresh.status_code == 200 and "HX-Request" in fresh.headers["vary"]
        again = http.get("/jobs/etag-1", headers={**HX, "If-None-Match": etag})
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
        assert "etag" not in http.get("/jobs/etag-1").headers, "a page load is never a 304"
        assert http.post("/api/v1/jobs/etag-1/pause", json={"note": "now"}).status_code == 200
        changed = http.get("/jobs/etag-1", headers={**HX, "If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag and "now" in changed.text


VALID_IDS = ["a:b", "x.y", "-", "...", "new", "_", "A.B-c_d:e", "jobs"]
INVALID_IDS = ["a/b", "a b", "héllo", "50%", ".", "..", "a?b", "a#b", ""]


def test_every_valid_job_id_has_a_page_and_api_routes(settings: AppSettings, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    with console.http() as http:
        for job_id in VALID_IDS:
            created = http.post("/api/v1/jobs", json={"spec": {"id": job_id, "task": "demo.sleep", **DAILY}})
            assert created.status_code == 201, (job_id, created.text)
            path = quote(job_id, safe="")
            assert http.get(f"/api/v1/jobs/{path}").json()["record"]["id"] == job_id
            assert http.get(f"/api/v1/jobs/{path}/history").json() == []
            assert http.post(f"/api/v1/jobs/{path}/pause", json={"note": "id test"}).json()["paused"] is True
            page = http.get(f"/jobs/{path}")
            assert page.status_code == 200 and f'<span id="job-id">{job_id}</span>' in page.text, job_id
            listed = http.get("/jobs", params={"q": job_id}).text
            assert f'href="/jobs/{path}"' in listed, job_id
        assert http.get("/new").status_code == 200 and "New job" in http.get("/new").text
        for job_id in INVALID_IDS:
            refused = http.post("/api/v1/jobs", json={"spec": {"id": job_id, "task": "demo.sleep", **DAILY}})
            assert refused.status_code == 422, job_id
            assert refused.json()["error"].startswith(f"job {job_id!r}: id: {job_id!r} "), (job_id, refused.text)
        assert http.get("/api/v1/jobs").json()["total"] == len(VALID_IDS)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{console.url}/jobs/a/b", timeout=5).raise_for_status()


def test_the_timeline_is_reused_until_a_job_changes(settings: AppSettings, start_console: Any) -> None:
    """Computed once beyond its end and reused while no job changes; a job created or paused
    through another process is in it within TIMELINE_TTL_S."""
    first, second = start_console(settings), start_console(settings)
    every_minute = {"task": "demo.sleep", "cron": "* * * * *"}
    with first.http() as a, second.http() as b:
        assert b.post("/api/v1/jobs", json={"spec": {"id": "tl-1", **every_minute}}).status_code == 201

        def jobs_in_timeline() -> set[str]:
            return {fire["job"] for fire in a.get("/api/v1/timeline", params={"minutes": 10}).json()}

        assert jobs_in_timeline() == {"tl-1"}
        assert b.post("/api/v1/jobs", json={"spec": {"id": "tl-2", **every_minute}}).status_code == 201
        wait_for(lambda: jobs_in_timeline() == {"tl-1", "tl-2"}, TIMELINE_TTL_S + 10, "the new job in the timeline")
        assert b.post("/api/v1/jobs/tl-1/pause", json={"note": "quiet"}).status_code == 200
        wait_for(lambda: jobs_in_timeline() == {"tl-2"}, TIMELINE_TTL_S + 10, "the paused job out of the timeline")
