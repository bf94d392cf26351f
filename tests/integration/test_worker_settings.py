"""Starting workers with bad settings or credentials fails fast and says why, without leaking."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from shared.client import Client
from shared.settings import AppSettings
from tests.conftest import ROOT, RedisServer, WorkerProcess, make_settings, settings_env

pytestmark = pytest.mark.timeout(60)


def run_worker(env: dict[str, str], *args: str, timeout_s: float = 20) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_worker.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_bad_settings_fail_with_one_line_per_problem(settings: AppSettings) -> None:
    env = settings_env(settings) | {
        "WORKER_CONCURRENCY": "lots",
        "CELERY_VISIBILITY_TIMEOUT_S": "60",
        "WORKER_POOL": "gevent",
    }
    code, output, _ = run_worker(env)
    assert code == 78
    assert "WORKER_CONCURRENCY" in output and "'lots'" in output
    assert "WORKER_POOL" in output
    assert "CELERY_VISIBILITY_TIMEOUT_S (60) must be greater than CELERY_TASK_TIME_LIMIT_S (1800)" in output
    assert "Traceback" not in output


def test_unknown_key_in_env_file_fails(settings: AppSettings, tmp_path: pytest.TempPathFactory) -> None:
    env_file = tmp_path / "bad.env"  # type: ignore[operator]
    env_file.write_text("WORKER_CONCURENCY=2\n")
    code, output, _ = run_worker(settings_env(settings), "--env-file", str(env_file))
    assert code == 78
    assert "WORKER_CONCURENCY: unknown setting" in output


def test_wrong_password_fails_fast(secured_redis: RedisServer, namespace: str) -> None:
    wrong = make_settings(f"redis://:not-the-password@127.0.0.1:{secured_redis.port}/0", namespace)
    code, output, elapsed = run_worker(settings_env(wrong))
    assert code == 78
    assert elapsed < 10
    assert "rejected our credentials" in output or "requires a password" in output
    assert "not-the-password" not in output


def test_password_never_logged(
    secured_redis: RedisServer, namespace: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    password = secured_redis.password
    assert password
    settings = make_settings(secured_redis.url, namespace)
    worker = start_worker(settings, "--pool", "threads", "-c", "1", extra_env={"LOG_LEVEL": "DEBUG"})
    with Client(settings) as client:
        assert client.result(client.submit("demo.number_sum", [1, 2]), timeout=10) == 3
    worker.stop()
    log = worker.log()
    assert "127.0.0.1" in log  # the broker URL was logged, redacted
    assert password not in log
