"""The settings a fleet's run leases rely on: visibility timeout against time limit and slot
margin (fleet-wide and per job), and prompt redelivery of a dead worker's messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kombu.transport.redis import Channel

from scheduler.specs import JobSpec, time_limit_problems
from shared.celery_app import celery_config, restore_interval_s
from shared.errors import EX_CONFIG, ConfigError
from shared.settings import AppSettings
from tests.conftest import ROOT, RedisServer, make_settings, settings_env, write_jobs

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "test-no-such-env-file")
    for key in [k for k in os.environ if k.startswith(("CELERY_", "SCHEDULER_"))]:
        monkeypatch.delenv(key)


def test_visibility_timeout_must_exceed_time_limit_plus_slot_margin() -> None:
    with pytest.raises(ConfigError) as raised:
        AppSettings.load(celery={"visibility_timeout_s": 1830, "task_time_limit_s": 1800})
    assert raised.value.problems == [
        "settings (environment): CELERY_VISIBILITY_TIMEOUT_S (1830) must be greater than "
        "CELERY_TASK_TIME_LIMIT_S (1800) + SCHEDULER_SLOT_MARGIN_S (30), or a task that outlives its run lease "
        "is delivered twice"
    ]
    AppSettings.load(celery={"visibility_timeout_s": 1831, "task_time_limit_s": 1800})
    AppSettings.load(celery={"visibility_timeout_s": 1801, "task_time_limit_s": 1800}, scheduler={"slot_margin_s": 0})


@pytest.mark.parametrize("entry", ["run_worker.py", "run_scheduler.py"])
def test_processes_do_not_start_with_a_visibility_timeout_inside_the_run_lease(
    entry: str, redis_server: RedisServer, namespace: str
) -> None:
    settings = make_settings(redis_server.url, namespace)
    env = settings_env(settings) | {"CELERY_VISIBILITY_TIMEOUT_S": "1820", "SCHEDULER_SLOT_MARGIN_S": "30"}
    done = subprocess.run(
        [sys.executable, str(ROOT / entry)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == EX_CONFIG, output
    assert "CELERY_VISIBILITY_TIMEOUT_S (1820) must be greater than CELERY_TASK_TIME_LIMIT_S (1800) + " in output
    assert "SCHEDULER_SLOT_MARGIN_S (30)" in output
    assert "Traceback" not in output


def test_job_time_limits_are_checked_against_the_visibility_timeout() -> None:
    settings = AppSettings.load(
        celery={"visibility_timeout_s": 600, "task_time_limit_s": 60}, scheduler={"slot_margin_s": 30}
    )
    specs = [
        JobSpec(id="fits", task="demo.sleep", interval=60, time_limit=569, source="configs/jobs.yaml"),
        JobSpec(id="too-long", task="demo.sleep", interval=60, time_limit=570, source="configs/jobs.yaml"),
        JobSpec(id="default", task="demo.sleep", interval=60),
        JobSpec(id="coded", task="demo.sleep", interval=60, time_limit=3600),
    ]
    assert time_limit_problems(specs, settings) == [
        "configs/jobs.yaml: job 'too-long': time_limit: 570 s + SCHEDULER_SLOT_MARGIN_S (30) must be below "
        "CELERY_VISIBILITY_TIMEOUT_S (600); lower it or raise the visibility timeout",
        "code: job 'coded': time_limit: 3600 s + SCHEDULER_SLOT_MARGIN_S (30) must be below "
        "CELERY_VISIBILITY_TIMEOUT_S (600); lower it or raise the visibility timeout",
    ]


@pytest.mark.parametrize(("visibility_timeout_s", "interval_s"), [(8, 1), (25, 2), (100, 10), (3600, 10)])
def test_unacked_messages_are_swept_every_tenth_of_the_visibility_timeout(
    visibility_timeout_s: int, interval_s: int
) -> None:
    assert restore_interval_s(visibility_timeout_s) == interval_s


def test_transport_sweeps_for_unacked_messages_on_every_tick(redis_server: RedisServer, namespace: str) -> None:
    settings = make_settings(redis_server.url, namespace, celery={"visibility_timeout_s": 50, "task_time_limit_s": 10})
    transport = celery_config(settings)["broker_transport_options"]
    assert (transport["unacked_restore_interval"], transport["unacked_restore_throttle"]) == (5, 1)
    # Options kombu does not know are dropped silently: make sure this kombu reads both.
    assert {"unacked_restore_interval", "unacked_restore_throttle"} <= set(Channel.from_transport_options)


def test_scheduler_refuses_a_job_whose_time_limit_outlives_the_visibility_timeout(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, namespace)
    jobs = write_jobs(
        tmp_path / "jobs.yaml", [{"id": "long", "task": "demo.sleep", "interval": 60, "time_limit": 3590}]
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker"],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == EX_CONFIG, output
    assert f"{jobs}: job 'long': time_limit: 3590 s + SCHEDULER_SLOT_MARGIN_S (30) must be below" in output
    assert not redis_server.client().keys(f"{settings.redis.key_prefix}*")
