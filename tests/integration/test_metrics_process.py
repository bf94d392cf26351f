"""The metrics server runs in its own process (scheduler/metricsd.py), owned by the scheduler:
it ends when the scheduler is SIGKILLed, a killed one is started again with nothing lost, and
the scheduler's own metrics reach its /metrics through prometheus_client's multiprocess files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import AppSettings
from tests.conftest import SchedulerProcess, wait_for, write_jobs

pytestmark = pytest.mark.timeout(120)

JOBS = [{"id": "tick", "task": "demo.record_fire", "interval": 1, "overlap": "allow"}]  # no worker: no skips


def server_of(replica: SchedulerProcess) -> psutil.Process:
    """The replica's metrics server process (its one child running scheduler.metricsd)."""

    def found() -> psutil.Process | None:
        for child in psutil.Process(replica.process.pid).children():
            try:
                if "scheduler.metricsd" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    return wait_for(found, 15, "the metrics server process")  # type: ignore[no-any-return]


def gone(process: psutil.Process) -> bool:
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def ready(replica: SchedulerProcess) -> bool:
    """/readyz says 200 (False while nothing listens: between two servers)."""
    try:
        return replica.get("/readyz")[0] == 200
    except OSError:
        return False


def sample(replica: SchedulerProcess, name: str, **labels: str) -> float | None:
    status, text = replica.get("/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_the_server_ends_with_the_scheduler_even_when_it_is_sigkilled(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    (replica,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS))
    wait_for(lambda: ready(replica), 15, "ready")
    server = server_of(replica)
    shared = Path(json.loads(server.environ()["CHRONOQ_METRICSD"])["dir"])
    assert (shared / "state.bin").is_file() and server.pid != replica.process.pid
    replica.process.kill()
    replica.process.wait(10)
    wait_for(lambda: gone(server), 10, "the metrics server to end after its scheduler")
    wait_for(lambda: not shared.exists(), 10, "the killed scheduler's shared files to be removed")


def test_a_killed_server_is_noticed_and_started_again_with_nothing_lost(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    (replica,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS))
    wait_for(lambda: (sample(replica, "chronoq_fire_lag_seconds_count") or 0) >= 2, 20, "two fires observed")
    before = sample(replica, "chronoq_fire_lag_seconds_count") or 0
    server = server_of(replica)
    server.kill()
    wait_for(lambda: f"metrics server (pid {server.pid}) exited" in replica.log(), 10, "the death to be logged")
    again = wait_for(lambda: (p := server_of(replica)).pid != server.pid and p, 15, "another metrics server")
    wait_for(lambda: ready(replica), 15, "the new server to say ready")
    after = sample(replica, "chronoq_fire_lag_seconds_count") or 0
    assert after >= before, "the counters are the scheduler's: a new server loses none"
    assert sample(replica, "chronoq_job_paused", job="tick") == 0, "the job data reaches the new server"
    assert replica.process.poll() is None and again.is_running()


def test_the_schedulers_own_metrics_reach_the_server_with_their_help_texts(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    (replica,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS))
    wait_for(lambda: (sample(replica, "chronoq_fire_lag_seconds_count") or 0) >= 2, 20, "fires observed")
    dispatched = sample(replica, "chronoq_replica_decisions_total", outcome="dispatched") or 0
    assert dispatched >= 2
    status, text = replica.get("/metrics")
    assert status == 200
    assert "# HELP chronoq_fire_lag_seconds Publish time minus nominal fire time" in text
    assert 'pid="' not in text, "one writer: no per-process label"
    assert sample(replica, "chronoq_leader") == 1
    # process_* metrics are the scheduler's own process, not the server's
    cpu = sample(replica, "process_cpu_seconds_total")
    scheduler = psutil.Process(replica.process.pid).cpu_times()
    assert cpu is not None and cpu <= scheduler.user + scheduler.system + 0.05
    assert sample(replica, "process_start_time_seconds") == pytest.approx(
        psutil.Process(replica.process.pid).create_time(), abs=1.0
    )


NAMED = {
    "chronoq_fires_total": "counter from Redis (the fleet collector)",
    "chronoq_jobs": "gauge of the fleet collector",
    "chronoq_leader": "the scheduler's own, from the multiprocess files",
    "chronoq_fire_lag_seconds_count": "a histogram's sample, from the multiprocess files",
    "process_cpu_seconds_total": "the scheduler's process collector",
    "python_info": "the platform collector",
    "chronoq_job_next_fire_timestamp_seconds": "per job (appended text)",
}


def test_name_filters_return_every_family_asked_for(
    settings: AppSettings, tmp_path: Path, start_scheduler: Callable[..., list[SchedulerProcess]]
) -> None:
    (replica,) = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", JOBS))
    wait_for(lambda: (sample(replica, "chronoq_fire_lag_seconds_count") or 0) >= 1, 20, "a fire observed")
    wait_for(lambda: "chronoq_fires_total{" in replica.get("/metrics")[1], 10, "the fleet's counters")
    for name, kind in NAMED.items():
        status, text = replica.get(f"/metrics?name[]={name}&name[]=python_gc_objects_collected_total")
        assert status == 200, text
        samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert name in samples, f"name[]={name} ({kind}) answered {text!r}"
        assert samples <= {name, "python_gc_objects_collected_total"}, f"only what was asked for: {samples}"
