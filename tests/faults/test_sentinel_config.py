"""Every entry point through Redis Sentinel (#15), against real ``redis-sentinel`` processes:
the CLI, a worker and an ad-hoc task (broker and result backend on kombu's and Celery's
``sentinel://`` transport) find the master; the start-up checks (credentials, eviction policy)
run against the master the Sentinels name; mistakes are one line and an exit code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from shared.settings import AppSettings
from tests.conftest import ROOT, WorkerProcess, chronoq, settings_env, terminate, wait_for
from tests.faults.sentinel_harness import DATA_PASSWORD, MASTER_NAME, SENTINEL_PASSWORD, SentinelGroup

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    sentinels = SentinelGroup(tmp_path_factory.mktemp("sentinel-config"))
    try:
        yield sentinels.start()
    finally:
        sentinels.stop()


def settings_for(group: SentinelGroup, namespace: str, **redis: Any) -> AppSettings:
    return AppSettings(
        _env_file=None,
        redis={
            "sentinels": group.addresses,
            "sentinel_master": MASTER_NAME,
            "sentinel_password": SENTINEL_PASSWORD,
            "password": DATA_PASSWORD,
            "key_prefix": f"t{namespace}:",
            "socket_timeout_s": 2,
            "socket_connect_timeout_s": 2,
            **redis,
        },
        celery={"cron_queue": f"cron_{namespace}", "default_queue": f"celery_{namespace}"},
    )


def test_cli_and_an_ad_hoc_task_through_sentinel(
    group: SentinelGroup, start_worker: Callable[..., WorkerProcess], namespace: str
) -> None:
    settings = settings_for(group, namespace)
    worker = start_worker(settings, "--pool", "threads", "--concurrency", "2")
    assert "sentinel://" in worker.log() and DATA_PASSWORD not in worker.log()
    assert chronoq(settings, "health").returncode == 0
    result = chronoq(settings, "task", "submit", "demo.number_sum", "--args", "[2, 3]", "--wait", "20")
    assert result.stdout.strip().splitlines()[-1].endswith("5"), result.stdout
    # The message and its result went to the master the Sentinels name.
    with group.master().client() as client:
        assert client.keys("celery-task-meta-*")


@pytest.mark.parametrize(
    ("redis", "code", "words"),
    [
        ({"sentinel_password": "wrong-sentinel-pw"}, 78, "REDIS_SENTINEL_PASSWORD"),
        ({"password": "wrong-data-pw"}, 78, "REDIS_PASSWORD"),
        ({"sentinel_master": "nobody"}, 69, "redis master 'nobody' via Sentinels"),
    ],
)
def test_sentinel_mistakes_are_one_line_and_an_exit_code(
    group: SentinelGroup, namespace: str, redis: dict[str, Any], code: int, words: str
) -> None:
    settings = settings_for(group, namespace, **redis)
    for command in (["health"], ["status"], ["jobs", "list"]):
        result = chronoq(settings, *command, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, result.stderr
        assert len(lines) == 1 and words in lines[0], lines
        assert "Traceback" not in result.stderr and "wrong-" not in result.stderr
    worker = subprocess.run(
        [sys.executable, str(ROOT / "run_worker.py")],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == code, worker.stdout + worker.stderr
    assert words in worker.stdout + worker.stderr


def test_the_eviction_check_reads_the_master_the_sentinels_name(
    group: SentinelGroup, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(group, namespace)
    with group.master().client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        for entry in ("run_worker.py", "run_scheduler.py"):
            jobs = tmp_path / "jobs.yaml"
            jobs.write_text("jobs: []\n")
            args = ["--jobs", str(jobs)] if entry == "run_scheduler.py" else []
            result = subprocess.run(
                [sys.executable, str(ROOT / entry), *args],
                cwd=ROOT,
                env=settings_env(settings),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 78, result.stdout + result.stderr
            assert "maxmemory-policy is allkeys-lru" in result.stdout + result.stderr
    finally:
        with group.master().client() as client:
            client.config_set("maxmemory-policy", "noeviction")


def gone_or_zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def reaped(pid: int) -> bool:
    try:
        psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return False


@pytest.mark.parametrize("flag", ["--worker", None], ids=["with-worker", "default"])
def test_the_scheduler_reaps_a_local_worker_that_exits_and_starts_none_by_default(
    group: SentinelGroup, namespace: str, tmp_path: Path, flag: str | None
) -> None:
    """No Sentinel names the master: a local worker exits 69 at once. The scheduler (which waits
    for the master) reaps it the moment it ends (it was still a zombie 8 s later) and starts
    another. Without ``--worker`` it starts none: with Sentinel, Redis is not embedded."""
    settings = settings_for(group, namespace, sentinel_master="nobody")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("jobs: []\n")
    log_path = tmp_path / "scheduler.log"
    with log_path.open("wb") as out:
        scheduler = subprocess.Popen(
            [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), *([flag] if flag else [])],
            cwd=ROOT,
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started: list[int] = []
    try:

        def log() -> str:
            return log_path.read_text(errors="replace")

        wait_for(lambda: "redis master 'nobody'" in log() or scheduler.poll() is not None, 30, "the scheduler to wait")
        assert scheduler.poll() is None, log()
        if flag is None:
            assert "local worker" not in log()
            return
        started += [int(pid) for pid in re.findall(r"started a local worker pid=(\d+)", log())]
        assert started, log()
        wait_for(lambda: gone_or_zombie(started[0]), 30, "the local worker to exit (no master)")
        wait_for(lambda: reaped(started[0]), 2, "the scheduler to reap its local worker")
        assert f"local worker pid={started[0]} exited with status 69" in log(), log()
        wait_for(lambda: log().count("started a local worker pid=") >= 2, 10, "another local worker")
        started += [int(pid) for pid in re.findall(r"started a local worker pid=(\d+)", log())]
    finally:
        code = terminate(scheduler)
        for pid in started:  # each in its own session
            if not reaped(pid):
                os.killpg(pid, signal.SIGKILL)
    assert code == 0, log()
    assert all(reaped(pid) for pid in started)
