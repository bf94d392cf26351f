"""``/api/v1`` over real HTTP: a ``chronoq web`` process against a real redis-server and a real
scheduler process (and, where a run must happen, a real Celery worker). Each answer is checked
against what ``chronoq`` (its own process) says about the same fleet."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import (
    ROOT,
    RedisServer,
    SchedulerProcess,
    chronoq,
    free_port,
    settings_env,
    wait_for,
    write_jobs,
)
from tests.web.conftest import ConsoleProcess, answers

pytestmark = pytest.mark.timeout(120)

FILE_JOB = {"id": "file-heartbeat", "task": "demo.record_fire", "interval": 3600}
HOURLY = {"id": "file-hourly", "task": "demo.record_fire", "cron": "0 * * * *"}


@pytest.fixture
def fleet(settings: AppSettings, tmp_path: Path, start_scheduler: Any) -> SchedulerProcess:
    replicas: list[SchedulerProcess] = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", [FILE_JOB, HOURLY]))
    return replicas[0]


def test_reads_match_the_cli(settings: AppSettings, fleet: SchedulerProcess, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    with console.http() as http:
        status = wait_for(lambda: (s := http.get("/api/v1/status").json())["leader"] and s, 15, "a leader")
        assert status["leader"] == fleet.owner
        cli_status = json.loads(chronoq(settings, "status", "--json").stdout)
        assert [r["id"] for r in status["replicas"]] == [r["id"] for r in cli_status["replicas"]]
        assert http.get("/api/v1/replicas").json()["leader"] == fleet.owner
        assert http.get("/api/v1/workers").status_code == 200

        page = http.get("/api/v1/jobs", params={"q": "HEART"}).json()
        assert (page["total"], page["items"][0]["id"], page["items"][0]["source"]) == (1, "file-heartbeat", "file")
        cli_list = json.loads(chronoq(settings, "jobs", "list", "--json").stdout)
        assert page["items"][0]["next_fire"] == next(r for r in cli_list if r["id"] == "file-heartbeat")["next_fire"]
        assert http.get("/api/v1/jobs", params={"q": "nothing-like-it"}).json()["total"] == 0

        shown = http.get("/api/v1/jobs/file-heartbeat").json()
        assert shown["record"]["owner"].endswith("jobs.yaml") and shown["trigger"] == "every 1h"
        timeline = http.get("/api/v1/timeline", params={"minutes": 90}).json()
        cli_next = json.loads(chronoq(settings, "jobs", "show", "file-heartbeat", "--json").stdout)["next_fires"]
        heartbeat = [f["at"] for f in timeline if f["job"] == "file-heartbeat"]
        assert 1 <= len(heartbeat) <= 2 and heartbeat == cli_next[: len(heartbeat)], "the fires `jobs show` lists"
        assert [f["job"] for f in timeline].count("file-hourly") in (1, 2)
        assert [f["at"] for f in timeline] == sorted(f["at"] for f in timeline)

        missing = http.get("/api/v1/jobs/no-such-job")
        assert missing.status_code == 404
        cli_missing = chronoq(settings, "jobs", "show", "no-such-job", check=False)
        assert missing.json()["error"] in cli_missing.stdout + cli_missing.stderr

        schema = http.get("/api/v1/openapi.json").json()
        assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}/backfill", "/api/v1/status"} <= set(schema["paths"])


def test_changes_go_through_the_operations_layer_and_the_audit_trail(
    settings: AppSettings, fleet: SchedulerProcess, start_console: Any, start_worker: Any
) -> None:
    console: ConsoleProcess = start_console(settings)
    with console.http() as http:
        spec = {"id": "api-job", "task": "demo.record_fire", "interval": 3600, "args": []}
        created = http.post("/api/v1/jobs", json={"spec": spec, "note": "made over http"})
        assert created.status_code == 201, created.text
        assert (created.json()["version"], created.json()["created_by"]) == (1, "web:anonymous@127.0.0.1")

        stale = http.patch("/api/v1/jobs/api-job", json={"changes": {"interval": 60}, "expected_version": 7})
        assert stale.status_code == 409 and "version conflict" in stale.json()["error"]
        edited = http.patch("/api/v1/jobs/api-job", json={"changes": {"interval": 60}, "expected_version": 1})
        assert edited.status_code == 200 and edited.json()["spec"]["interval"] == 60

        owned = http.delete("/api/v1/jobs/file-heartbeat")
        assert owned.status_code == 409 and "jobs.yaml" in owned.json()["error"]

        paused = http.post("/api/v1/jobs/file-heartbeat/pause", json={"note": "disk full, back at 6"})
        assert paused.status_code == 200 and paused.json()["paused"]
        shown = json.loads(chronoq(settings, "jobs", "show", "file-heartbeat", "--json").stdout)
        assert (shown["paused"], shown["paused_note"]) == (True, "disk full, back at 6")
        assert any(
            a["action"] == "pause" and a["by"] == "web:anonymous@127.0.0.1" and a["note"] == "disk full, back at 6"
            for a in shown["audit"]
        )

        start_worker(settings)
        triggered = http.post("/api/v1/jobs/file-heartbeat/trigger", json={"note": "by hand"})
        assert triggered.status_code == 200 and triggered.json()["outcome"] == "dispatched", triggered.text
        task_id = triggered.json()["task_id"]

        def ran() -> bool:
            history = http.get("/api/v1/jobs/file-heartbeat/history").json()
            return any(e.get("task_id") == task_id and e["final"] == "succeeded" for e in history)

        wait_for(ran, 30, "the triggered fire to run on the worker")
        assert http.get("/api/v1/outcomes", params={"job": "file-heartbeat"}).json().get("succeeded") == 1

        audit = http.get("/api/v1/audit", params={"job": "api-job"}).json()
        assert [a["action"] for a in audit][:2] == ["update", "create"]
        deleted = http.delete("/api/v1/jobs/api-job", params={"expected_version": 2, "note": "done"})
        assert deleted.status_code == 200
        assert http.get("/api/v1/jobs/api-job").status_code == 404


def test_bad_input_is_refused_with_the_cli_messages_and_stores_nothing(
    settings: AppSettings, redis_server: RedisServer, start_console: Any
) -> None:
    console: ConsoleProcess = start_console(settings)
    keys = RedisKeys(settings.redis.key_prefix)
    bad = {"id": "bad-job", "task": "demo.sleep", "cron": "61 * * * *", "max_instances": 0}
    cli = chronoq(settings, "jobs", "add", "--spec", json.dumps(bad), check=False)
    cli_lines = [line.removeprefix("chronoq: ") for line in cli.stderr.splitlines()]
    with console.http() as http:
        refused = http.post("/api/v1/jobs", json={"spec": bad})
        assert refused.status_code == 422
        assert refused.json()["problems"] == cli_lines and len(cli_lines) == 2, cli.stderr
        assert all("bad-job" in line for line in cli_lines)
        assert http.post("/api/v1/jobs", json={"nospec": 1}).status_code == 422
        assert http.post("/api/v1/jobs/bad-job/pause", json={"note": "x"}).status_code == 404
    with redis_server.client() as r:
        assert r.hgetall(keys.api_jobs) == {} and r.exists(keys.changes) == 0


def test_backfill_preview_sends_nothing_and_the_real_one_sends_the_same_fires(
    settings: AppSettings, fleet: SchedulerProcess, start_console: Any, redis_server: RedisServer
) -> None:
    console: ConsoleProcess = start_console(settings)
    end = datetime.now(UTC).replace(second=30, microsecond=0) - timedelta(minutes=5)
    body = {"start": (end - timedelta(hours=3)).isoformat(), "end": end.isoformat(), "note": "outage"}
    keys = RedisKeys(settings.redis.key_prefix)
    with console.http() as http:
        preview = http.post("/api/v1/jobs/file-hourly/backfill", json={**body, "dry_run": True}).json()
        assert preview["dry_run"] and len(preview["dispatched"]) == 3, preview
        with redis_server.client() as r:
            assert r.llen(keys.history("file-hourly")) == 0, "a preview sends nothing"
        sent = http.post("/api/v1/jobs/file-hourly/backfill", json=body).json()
        assert sent["dispatched"] == preview["dispatched"] and not sent["dry_run"]
        too_many = http.post(
            "/api/v1/jobs/file-hourly/backfill",
            json={**body, "start": (end - timedelta(days=3650)).isoformat(), "dry_run": True},
        )
        assert too_many.status_code == 422 and "file-hourly" in too_many.json()["error"]


def test_run_scheduler_web_starts_the_console_and_stops_it(settings: AppSettings, tmp_path: Path) -> None:
    """``make run`` is ``run_scheduler.py --web``: the console prints its URL, answers, and goes
    away with the scheduler."""
    port = free_port()
    log_path = tmp_path / "run.log"
    jobs = write_jobs(tmp_path / "jobs.yaml", [FILE_JOB])
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker", "--web"],
            cwd=ROOT,
            env={**settings_env(settings), "WEB_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: f"console at {url}/" in log_path.read_text() or process.poll() is not None, 30, "the URL")
        wait_for(lambda: answers(url), 15, "the console to answer")
        assert httpx.get(f"{url}/api/v1/jobs/file-heartbeat", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()[-3000:]
    assert not answers(url), "the console stopped with the scheduler"
