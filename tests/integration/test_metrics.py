"""The replicas' HTTP server with real processes: /metrics against what Redis and the workers
say, the leader gauge through a failover, /healthz against a wedged event loop, /readyz and
scrapes while Redis is down, a port in use."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.api import Client
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import (
    ROOT,
    RedisServer,
    SchedulerProcess,
    WorkerProcess,
    executions,
    make_settings,
    settings_env,
    start_redis_server,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(replica: SchedulerProcess) -> Samples:
    """Every sample of the replica's /metrics: (name, sorted labels) -> value."""
    status, text = replica.get("/metrics")
    assert status == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def until_status(replica: SchedulerProcess, path: str, status: int, timeout_s: float, what: str) -> str:
    """Poll ``path`` until it answers ``status``; its body."""

    def answered() -> str | None:
        code, body = replica.get(path)
        return body if code == status else None

    return str(wait_for(answered, timeout_s, what))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_scraped_counters_equal_redis_records_and_worker_runs(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client = redis_server.client()
    keys = RedisKeys(settings.redis.key_prefix)
    worker = start_worker(settings, "--pool", "threads", "--concurrency", "3")
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "idle", "task": "demo.record_fire", "cron": "0 3 1 1 *"}])
    (replica,) = start_scheduler(settings, jobs, extra_env={"HTTP_FLEET_CACHE_S": "0"})
    # The firing jobs come through the API once the replica runs, so that their 8 s of fires do
    # not shrink by however long the replica took to start (6 s and more on a loaded machine).
    end = (datetime.now(UTC) + timedelta(seconds=8)).isoformat()
    with Client(settings, by="test") as api:
        api.create({"id": "a", "task": "demo.record_fire", "interval": 1, "end_date": end})
        api.create({"id": "b", "task": "demo.record_fire", "interval": 2, "end_date": end})
        api.create({"id": "slow", "task": "demo.record_fire", "interval": 1, "args": [2.5], "end_date": end})

    seen: dict[str, Any] = {}

    def settled() -> bool:
        runs = executions(client, settings)
        succeeded = int(client.hget(keys.counters, "succeeded") or 0)
        past_end = datetime.now(UTC).isoformat() > end
        queued = client.llen(settings.celery.cron_queue)
        seen.update(runs=len(runs), succeeded=succeeded, queued=queued, past_end=past_end)
        return past_end and len(runs) >= 5 and succeeded == len(runs) and queued == 0

    try:
        wait_for(settled, 40, "the fires to end and every run to finish")
    except pytest.fail.Exception:
        pytest.fail(f"not settled: {seen}\nworker:\n{worker.log()[-3000:]}\nscheduler:\n{replica.log()[-3000:]}")
    runs = executions(client, settings)
    samples = scrape(replica)

    records: dict[str, list[dict[Any, Any]]] = {
        job: [client.hgetall(keys.fire(job, str(stamp))) for stamp in client.lrange(keys.history(job), 0, -1)]
        for job in ("a", "b", "slow")
    }
    dispatched = [f for fires in records.values() for f in fires if f["outcome"] == "dispatched"]
    assert len(dispatched) == len(runs)
    assert value(samples, "chronoq_fires_total", outcome="dispatched") == len(dispatched)
    assert value(samples, "chronoq_fires_total", outcome="succeeded") == len(runs)
    assert value(samples, "chronoq_fires_total", outcome="failed") == 0
    overlapped = [f for f in records["slow"] if f["outcome"] == "skipped" and f["reason"].startswith("overlap")]
    assert len(overlapped) >= 2, "the slow job's fires overlap its 2.5 s runs"
    assert value(samples, "chronoq_fires_total", outcome="skipped") == len(overlapped)
    assert value(samples, "chronoq_fires_skipped_total", reason="overlap") == len(overlapped)
    assert value(samples, "chronoq_fires_skipped_total", reason="paused") == 0
    assert value(samples, "chronoq_job_fires_total", job="slow", outcome="skipped") == len(overlapped)
    assert value(samples, "chronoq_fleet_data_available") == 1
    for job in ("a", "b"):
        ran = [r for r in runs if r["job_id"] == job]
        assert value(samples, "chronoq_job_fires_total", job=job, outcome="dispatched") == len(ran)
        assert value(samples, "chronoq_job_fires_total", job=job, outcome="succeeded") == len(ran)
        last = max(datetime.fromisoformat(r["scheduled_at"]).timestamp() for r in ran)
        assert value(samples, "chronoq_job_last_fire_timestamp_seconds", job=job) == last
        success = value(samples, "chronoq_job_last_success_timestamp_seconds", job=job)
        assert success is not None and success >= last
        assert value(samples, "chronoq_job_inflight", job=job) == 0
    # The replica's own account of the same fires: one lag observation and one task-sent event each.
    assert value(samples, "chronoq_fire_lag_seconds_count") == len(runs)
    assert value(samples, "chronoq_task_sent_events_total") == len(runs)
    assert value(samples, "chronoq_replica_decisions_total", outcome="dispatched") == len(runs)
    assert value(samples, "chronoq_leader") == 1
    assert value(samples, "chronoq_jobs") == 4
    nightly = value(samples, "chronoq_job_next_fire_timestamp_seconds", job="idle")
    assert nightly is not None and nightly > datetime.now(UTC).timestamp()
    assert value(samples, "chronoq_job_paused", job="idle") == 0
    info = [labels for (name, labels) in samples if name == "chronoq_job_info" and ("job", "idle") in labels]
    assert info and ("trigger", "cron") in info[0] and ("task", "demo.record_fire") in info[0]
    assert value(samples, "chronoq_workers_seen") == 1
    assert value(samples, "chronoq_worker_heartbeat_timestamp_seconds", worker=worker.hostname) is not None
    assert value(samples, "chronoq_queue_length", queue=settings.celery.cron_queue) == 0
    assert value(samples, "process_cpu_seconds_total") is not None


def test_the_leader_gauge_follows_a_failover(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
) -> None:
    client = redis_server.client()
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "tick", "task": "demo.record_fire", "interval": 1}])
    replicas = start_scheduler(settings, jobs, count=2)

    def leaders() -> list[float]:
        return [value(scrape(r), "chronoq_leader") or 0.0 for r in replicas if r.process.poll() is None]

    wait_for(lambda: sorted(leaders()) == [0, 1], 15, "one leader and one follower in the gauges")
    owner = client.get(f"{settings.redis.key_prefix}leader")
    leader = next(r for r in replicas if r.owner == owner)
    follower = next(r for r in replicas if r is not leader)
    leader.process.kill()
    leader.process.wait(5)
    wait_for(lambda: value(scrape(follower), "chronoq_leader") == 1, 10, "the survivor's gauge to say leader")
    status, body = follower.get("/readyz")
    assert status == 200 and json.loads(body)["role"] == "leader"
    # Fleet data is cached (HTTP_FLEET_CACHE_S): a scrape during the hand-over may still see none.
    wait_for(
        lambda: value(scrape(follower), "chronoq_fleet_leader_present") == 1, 10, "the fleet gauge to see a leader"
    )


def test_a_blocked_event_loop_fails_liveness_then_recovers(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "tick", "task": "demo.record_fire", "interval": 1}])
    env = {"HTTP_LIVENESS_TIMEOUT_S": "1", "HTTP_TEST_BLOCK_LOOP_S": "5"}
    (replica,) = start_scheduler(settings, jobs, extra_env=env)
    wait_for(lambda: replica.get("/healthz")[0] == 200, 10, "a healthy replica")
    replica.signal(signal.SIGUSR2)
    body = until_status(replica, "/healthz", 503, 4, "liveness to fail")
    assert json.loads(body)["alive"] is False
    # The HTTP server is not the loop: /metrics still answers while the loop is wedged.
    assert value(scrape(replica), "chronoq_leader") == 1
    wait_for(lambda: replica.get("/healthz")[0] == 200, 10, "liveness to recover")
    lag = scrape(replica)
    assert (value(lag, "chronoq_event_loop_lag_seconds_bucket", le="+Inf") or 0) > (
        value(lag, "chronoq_event_loop_lag_seconds_bucket", le="2.5") or 0
    ), "the 5 s block is in the loop lag histogram"
    assert "test hook: blocking the event loop" in replica.log()


def test_without_the_test_setting_sigusr2_does_not_block_the_loop(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "tick", "task": "demo.record_fire", "interval": 1}])
    (replica,) = start_scheduler(settings, jobs, extra_env={"HTTP_LIVENESS_TIMEOUT_S": "1"})
    wait_for(lambda: replica.get("/healthz")[0] == 200, 10, "a healthy replica")
    replica.signal(signal.SIGUSR2)  # no handler: the signal's default action ends the process
    wait_for(lambda: replica.process.poll() is not None, 5, "the process to end")
    assert replica.process.returncode == -signal.SIGUSR2
    assert "test hook" not in replica.log()


def test_readiness_and_scrapes_while_redis_is_down(
    tmp_path: Path, namespace: str, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    (tmp_path / "redis").mkdir()
    server = start_redis_server(tmp_path / "redis")
    settings = make_settings(server.url, namespace)
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "tick", "task": "demo.record_fire", "interval": 1}])
    (replica,) = start_scheduler(settings, jobs, extra_env={"HTTP_HOST": "0.0.0.0", "REDIS_SOCKET_TIMEOUT_S": "1"})
    try:
        body = until_status(replica, "/readyz", 200, 10, "ready")
        assert json.loads(body) | {"replica": ""} == {"ready": True, "role": "leader", "jobs": 1, "replica": ""}
        assert "listens beyond this host, without authentication" in replica.log()
        server.process.terminate()
        server.process.wait(10)
        body = until_status(replica, "/readyz", 503, 10, "not ready")
        assert json.loads(body)["reason"].startswith("redis: ")
        samples = wait_for(
            lambda: s if value(s := scrape(replica), "chronoq_fleet_data_available") == 0 else None,
            10,
            "fleet data to be reported unavailable",
        )
        assert value(samples, "process_cpu_seconds_total") is not None
        assert value(samples, "chronoq_fires_total", outcome="dispatched") is None
        assert replica.get("/healthz")[0] == 200, "Redis down is not a dead scheduler"
        assert replica.process.poll() is None
    finally:
        replica.stop()
        if server.process.poll() is None:
            server.process.terminate()
        server.process.wait(10)


def test_a_port_in_use_is_one_line_and_exit_78(settings: AppSettings, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "tick", "task": "demo.record_fire", "interval": 1}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker"],
            cwd=ROOT,
            env={**settings_env(settings), "HTTP_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 78, output
    assert "Traceback" not in output
    assert f"cannot listen on 127.0.0.1:{port}" in output and "HTTP_PORT" in output
    assert not redis_was_touched(settings)


def redis_was_touched(settings: AppSettings) -> bool:
    client = settings.redis.connection_url()
    import redis

    return bool(redis.Redis.from_url(client).keys(f"{settings.redis.key_prefix}*"))


def test_an_unknown_path_is_404(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "tick", "task": "demo.record_fire", "interval": 1}])
    (replica,) = start_scheduler(settings, jobs)
    assert replica.get("/")[0] == 404
    assert replica.get("/debug")[0] == 404
