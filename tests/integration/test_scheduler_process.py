"""run_scheduler.py as a process: signals, bad files, reload on SIGHUP, a Redis outage."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis

from scheduler.service import SchedulerService, ServiceOptions, load_specs
from shared.redis_binary import find_redis_server_binary
from shared.settings import AppSettings
from tests.conftest import ROOT, RedisServer, free_port, make_settings, queued_fires, settings_env, wait_for, write_jobs

pytestmark = pytest.mark.timeout(90)


def start_scheduler(settings: AppSettings, jobs: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker", *extra],
            cwd=ROOT,
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_sigterm_exits_zero_in_time(settings: AppSettings, tmp_path: Path, redis_server: RedisServer) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [{"id": "tick", "task": "demo.sleep", "interval": 0.5, "args": [0]}],
        {"overlap": "allow"},
    )
    log = tmp_path / "scheduler.log"
    process = start_scheduler(settings, jobs, log)
    try:
        client = redis_server.client()
        wait_for(lambda: queued_fires(client, settings.celery.cron_queue), 20, "a first fire")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "scheduler stopped; outcomes" in text
    # Every dispatched fire was recorded before exit.
    dispatched = len(queued_fires(redis_server.client(), settings.celery.cron_queue))
    counters = redis_server.client().hgetall(f"{settings.redis.key_prefix}counters")
    assert int(counters["dispatched"]) == dispatched


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("jobs:\n  - id: a\n    task: demo.sleep\n    cron: '61 * * * *'\n", "jobs[0] (a): cron"),
        ("jobs:\n  - id: a\n    task: demo.sleep\n    interval: 5\n    crn: x\n", "jobs[0] (a): unknown key 'crn'"),
        (
            "jobs:\n  - id: a\n    task: demo.sleep\n    interval: 5\n  - id: a\n    task: demo.sleep\n    interval: 6\n",
            "jobs[1] (a): id 'a' is already used",
        ),
        ("jobs:\n  - id: a\n    task: demo.sleep\n    interval: 5\n    timezone: Mars/Base\n", "unknown time zone"),
        ("jobs:\n  - id: a\n    task: 'os.system; rm'\n    interval: 5\n", "is not a Celery task name"),
    ],
)
def test_bad_job_file_exits_78_and_writes_nothing(
    redis_server: RedisServer, namespace: str, tmp_path: Path, document: str, message: str
) -> None:
    settings = make_settings(redis_server.url.replace("/0", "/9"), namespace)
    client = redis.Redis.from_url(redis_server.url.replace("/0", "/9"))
    client.flushdb()
    path = tmp_path / "bad.yaml"
    path.write_text(document)
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(path), "--no-worker"],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78
    assert str(path) in done.stderr
    assert message in done.stderr
    assert client.dbsize() == 0


def test_sighup_reloads_job_files(settings: AppSettings, tmp_path: Path, redis_server: RedisServer) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [{"id": "first", "task": "demo.sleep", "interval": 0.5, "args": [0]}],
        {"overlap": "allow"},
    )
    log = tmp_path / "scheduler.log"
    process = start_scheduler(settings, jobs, log)
    client = redis_server.client()
    queue = settings.celery.cron_queue
    try:
        wait_for(lambda: any(f["job_id"] == "first" for f in queued_fires(client, queue)), 20, "the first job")
        write_jobs(jobs, [{"id": "second", "task": "demo.sleep", "interval": 0.5, "args": [0]}], {"overlap": "allow"})
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded job files: added=1 changed=0 removed=1" in log.read_text(), 10, "the reload")
        wait_for(lambda: any(f["job_id"] == "second" for f in queued_fires(client, queue)), 10, "the second job")
        # A broken file is rejected and the running set stays.
        jobs.write_text("jobs: [{id: x, task: demo.sleep}]\n")
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in log.read_text(), 10, "the rejection")
        count = sum(f["job_id"] == "second" for f in queued_fires(client, queue))
        wait_for(
            lambda: sum(f["job_id"] == "second" for f in queued_fires(client, queue)) > count,
            5,
            "the second job to keep firing",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()


async def test_redis_outage_loses_nothing_within_grace(namespace: str, tmp_path: Path) -> None:
    port = free_port()
    binary = str(find_redis_server_binary(None))
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(tmp_path),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, decode_responses=True)
    wait_for(lambda: _pings(client), 10, "redis to start")
    settings = make_settings(url, namespace, redis={"socket_timeout_s": 1, "socket_connect_timeout_s": 1})
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [
            {
                "id": "steady",
                "task": "demo.sleep",
                "interval": 0.5,
                "args": [0],
                "coalesce": False,
                "misfire_grace_time": 30,
            }
        ],
        {"overlap": "allow"},
    )
    options = ServiceOptions(job_files=[jobs], local_worker=False)
    queue = settings.celery.cron_queue
    try:
        async with SchedulerService(settings, options, load_specs(settings, options)) as service:
            await asyncio.to_thread(
                wait_for, lambda: len(queued_fires(client, queue)) >= 2, 10, "fires before the outage"
            )
            server.kill()
            server.wait(5)
            outage_started = datetime.now().astimezone()
            await asyncio.sleep(5)
            server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.to_thread(wait_for, lambda: _pings(client), 10, "redis to come back")
            recovered = datetime.now().astimezone()
            await asyncio.to_thread(
                wait_for,
                lambda: any(
                    datetime.fromisoformat(f["scheduled_at"]) > recovered + timedelta(seconds=1)
                    for f in queued_fires(client, queue)
                ),
                20,
                "fires after the outage",
            )
            outcomes = dict(service.dispatcher.outcomes)
        fires = sorted(datetime.fromisoformat(f["scheduled_at"]) for f in queued_fires(client, queue))
    finally:
        server.kill()
        server.wait(5)
    assert len(fires) == len(set(fires)), "a fire was published twice"
    steps = {round((b - a).total_seconds(), 3) for a, b in itertools.pairwise(fires)}
    assert steps == {0.5}, f"a gap in the fires: {fires}"
    assert fires[0] < outage_started < recovered < fires[-1]
    assert outcomes.get("missed", 0) == 0


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_watch_reloads_a_changed_file(settings: AppSettings, tmp_path: Path, redis_server: RedisServer) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.yaml", [{"id": "a", "task": "demo.sleep", "interval": 0.5, "args": [0]}], {"overlap": "allow"}
    )
    log = tmp_path / "scheduler.log"
    process = start_scheduler(settings, jobs, log, "--watch")
    client = redis_server.client()
    try:
        wait_for(lambda: any(f["job_id"] == "a" for f in queued_fires(client, settings.celery.cron_queue)), 20, "job a")
        write_jobs(jobs, [{"id": "b", "task": "demo.sleep", "interval": 0.5, "args": [0]}], {"overlap": "allow"})
        wait_for(lambda: any(f["job_id"] == "b" for f in queued_fires(client, settings.celery.cron_queue)), 10, "job b")
        assert "job files changed; reloading" in log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_quickstart_embedded_redis_and_local_worker(tmp_path: Path) -> None:
    """What `make run` does: no REDIS_URL, so embedded Redis and a local worker; the demo task
    runs and its result shows in the log; Ctrl-C stops everything cleanly."""
    jobs = write_jobs(
        tmp_path / "jobs.yaml", [{"id": "demo", "task": "demo.number_sum", "interval": 1, "args": [20, 22]}]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CELERY_", "WORKER_", "SCHEDULER_"))}
    env["HTTP_PORT"] = "0"
    env |= {"APP_ENV": "test", "PYTHONUNBUFFERED": "1", "REDIS_EMBEDDED_DIR": str(tmp_path / "redis")}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "succeeded in" in log.read_text() and "42" in log.read_text(), 60, "the demo task's result")
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "embedded redis started" in text
    assert "started a local worker" in text
    assert "embedded redis stopped" in text
    assert not (tmp_path / "redis" / "server.json").exists()
