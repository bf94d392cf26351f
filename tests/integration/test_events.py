"""Celery's event stream sees scheduled fires from dispatch: a real scheduler, a real worker, and
on the listening side Celery's own ``app.events.Receiver`` (what ``celery events`` runs) and a
real Flower process, whose API must show each fire as sent and then succeeded."""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from scheduler.api import Client
from shared.celery_app import create_celery_app
from shared.names import fire_task_id_of
from shared.settings import AppSettings
from tests.conftest import (
    ROOT,
    RedisServer,
    SchedulerProcess,
    WorkerProcess,
    chronoq,
    executions,
    free_port,
    serving,
    settings_env,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.timeout(120)


class EventLog:
    """Celery's Receiver in a thread, keeping every event it gets."""

    def __init__(self, settings: AppSettings) -> None:
        self.app = create_celery_app(settings, name="test-events")
        self.events: list[dict[str, Any]] = []
        self._connection = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(self._connection, handlers={"*": self.events.append})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventLog:
        self._thread.start()
        # PUB/SUB keeps nothing for late subscribers: listening is proven by hearing an event
        # that Celery's own dispatcher sends.
        with self.app.events.default_dispatcher() as dispatcher:

            def heard() -> bool:
                dispatcher.send("chronoq-probe")
                return any(e.get("type") == "chronoq-probe" for e in list(self.events))

            wait_for(heard, 10, "the event receiver to listen", interval_s=0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()
        self.app.close()

    def of(self, kind: str, task_id: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == kind and e.get("uuid") == task_id]


@pytest.fixture
def flower(settings: AppSettings, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A real Flower on a free port; yields a GET of its API returning JSON."""
    port = free_port()
    env = {**settings_env(settings), "FLOWER_UNAUTHENTICATED_API": "true"}
    command = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--address=127.0.0.1", f"--port={port}"]

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return json.loads(reply.read())

    with serving(
        command, tmp_path / "flower.log", lambda: get("/api/tasks"), "Flower to answer", 30, cwd=ROOT, env=env
    ):
        yield get


def test_fires_are_announced_as_sent_then_seen_succeeding(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
    flower: Callable[[str], Any],
) -> None:
    client = redis_server.client()
    start_worker(settings, "--pool", "threads", "--concurrency", "2")
    jobs = write_jobs(
        tmp_path / "jobs.yaml", [{"id": "evented", "task": "demo.record_fire", "interval": 1, "args": [0]}]
    )
    with EventLog(settings) as log:
        start_scheduler(settings, jobs)
        wait_for(lambda: len(executions(client, settings)) >= 3, 30, "three runs")
        runs = executions(client, settings)
        for run in runs[:3]:
            task_id = run["task_id"]
            wait_for(partial(log.of, "task-succeeded", task_id), 10, f"task-succeeded of {task_id}")
            (sent,) = log.of("task-sent", task_id)
            assert sent["name"] == "demo.record_fire"
            assert sent["queue"] == sent["routing_key"] == settings.celery.cron_queue
            assert sent["args"] == "(0,)" and sent["retries"] == 0
            assert sent["hostname"].startswith("chronoq-scheduler-")
            assert sent["timestamp"] <= log.of("task-succeeded", task_id)[0]["timestamp"]

    def flower_saw(task_id: str) -> dict[str, Any] | None:
        task: dict[str, Any] | None = flower("/api/tasks").get(task_id)
        return task if task and task.get("state") == "SUCCESS" and task.get("sent") else None

    for run in runs[:3]:
        task = wait_for(partial(flower_saw, run["task_id"]), 15, "Flower to show the fire sent and succeeded")
        assert task["name"] == "demo.record_fire"
        assert task["sent"] <= task["received"] <= task["succeeded"]


def test_no_task_sent_events_when_turned_off(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.yaml", [{"id": "quiet", "task": "demo.record_fire", "interval": 1, "overlap": "allow"}]
    )
    client = redis_server.client()
    with EventLog(settings) as log:
        (replica,) = start_scheduler(settings, jobs, extra_env={"CELERY_TASK_SEND_SENT_EVENT": "false"})
        wait_for(lambda: client.llen(settings.celery.cron_queue) >= 2, 15, "two fires queued")
        assert not [e for e in log.events if e.get("type") == "task-sent"]
    status, body = replica.get("/metrics")
    assert status == 200 and "chronoq_task_sent_events_total 0.0" in body


def test_a_manual_trigger_is_announced_too(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
) -> None:
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "yearly", "task": "demo.record_fire", "cron": "0 3 1 1 *"}])
    start_scheduler(settings, jobs)
    client = redis_server.client()
    wait_for(lambda: client.hexists(f"{settings.redis.key_prefix}jobs", "yearly"), 10, "the job registry")
    with EventLog(settings) as log:
        answer = json.loads(chronoq(settings, "jobs", "trigger", "yearly", "--json").stdout)
        assert answer["dispatched"] is True
        (sent,) = wait_for(partial(log.of, "task-sent", answer["task_id"]), 10, "the manual fire's task-sent")
        assert sent["name"] == "demo.record_fire"


def test_backfills_and_client_triggers_announce_every_fire_once(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """The paths that decide fires outside the dispatcher: ``Client.trigger`` (the API's and the
    console's too), a backfill (its fires at once) and a sequential one (the first at once, the
    rest from the leader's sweep as each one before has run)."""
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "yearly", "task": "demo.record_fire", "cron": "0 3 1 1 *"}])
    start_scheduler(settings, jobs)
    start_worker(settings)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)
    with EventLog(settings) as log, Client(settings) as client:
        client.create({"id": "late", "task": "demo.record_fire", "interval": 1, "enabled": False})
        wait_for(lambda: client.get("yearly"), 10, "the file job in the registry")
        manual = client.trigger("yearly")
        filled = client.backfill("late", start, start + timedelta(seconds=9))
        in_turn = client.backfill("late", start + timedelta(seconds=20), start + timedelta(seconds=22),
                                  overlap="sequential")  # fmt: skip
        assert manual.dispatched and len(filled.dispatched) == 10
        assert (len(in_turn.dispatched), len(in_turn.queued)) == (1, 2)
        expected = {manual.task_id} | {
            fire_task_id_of("late", stamp) for stamp in [*filled.dispatched, *in_turn.dispatched, *in_turn.queued]
        }

        def announced() -> list[str]:
            return [e["uuid"] for e in list(log.events) if e.get("type") == "task-sent"]

        wait_for(lambda: expected <= set(announced()), 20, "every fire's task-sent")
        sent = announced()
        assert sorted(sent) == sorted(expected), "each fire announced once, and nothing else"
