"""Users' own task packages: workers load them through TASK_MODULES without edits to chronoq,
and a schedule declared next to a task is picked up by the scheduler, which sends by name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.result import AsyncResult

from scheduler.service import SchedulerService, ServiceOptions, load_specs
from shared.celery_app import create_celery_app
from shared.client import Client
from shared.settings import AppSettings
from tests.conftest import ROOT, RedisServer, WorkerProcess, make_settings

pytestmark = pytest.mark.timeout(90)

MODULE = '''
from celery import shared_task
from shared.schedules import schedule

@schedule(id="acme-every-half-second", interval=0.5, args=["tick"])
@shared_task(name="acme.echo")
def echo(text):
    return f"echo: {text}"

@schedule(cron="0 3 * * *", timezone="Europe/Berlin", task="acme.nightly")
def nightly():
    """Not a task here: task= names what to send."""
'''


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "acme_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


async def test_user_tasks_and_declared_schedules(
    redis_server: RedisServer,
    namespace: str,
    user_package: Path,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = make_settings(redis_server.url, namespace, task_modules=["acme_tasks.jobs"])  # type: ignore[arg-type]
    options = ServiceOptions(job_files=[], local_worker=False)
    specs = {spec.id: spec for spec in load_specs(settings, options)}
    assert set(specs) == {"acme-every-half-second", "acme.nightly"}
    assert specs["acme-every-half-second"].task == "acme.echo"
    assert specs["acme.nightly"].timezone == "Europe/Berlin"

    worker = start_worker(
        settings,
        "-P",
        "threads",
        "-c",
        "2",
        extra_env={"TASK_MODULES": "acme_tasks.jobs", "PYTHONPATH": str(user_package)},
    )
    # Ad hoc: the worker knows the user's task.
    with Client(settings) as client:
        assert client.result(client.submit("acme.echo", ["hi"]), timeout=10) == "echo: hi"
    # Scheduled: the declared schedule fires and the worker runs it.
    async with SchedulerService(settings, options, list(specs.values())) as service:
        history = await _wait_dispatched(service, "acme-every-half-second")
    app = create_celery_app(settings)
    try:
        assert AsyncResult(history[0]["task_id"], app=app).get(timeout=10) == "echo: tick"
    finally:
        app.close()
    assert "acme.echo" in worker.log()


async def _wait_dispatched(service: SchedulerService, job_id: str) -> list[dict[str, object]]:
    import asyncio
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        history = [h for h in await service.state.history(job_id) if h["outcome"] == "dispatched"]
        if history:
            return history
        await asyncio.sleep(0.05)
    pytest.fail(f"{job_id} was never dispatched")


def test_declared_schedule_with_a_bad_field_is_reported(user_package: Path, tmp_path: Path) -> None:
    (user_package / "acme_bad.py").write_text(
        "from shared.schedules import schedule\n\n@schedule(cron='99 * * * *', task='acme.bad')\ndef bad(): ...\n"
    )
    settings = AppSettings(_env_file=None, task_modules=["acme_bad"])
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=r"TASK_MODULES schedule job 'acme.bad': cron '99 \* \* \* \*': minute"):
        load_specs(settings, ServiceOptions(job_files=[]))


def test_scheduler_never_imports_worker_code() -> None:
    code = (
        "import sys, scheduler.service, scheduler.cli, scheduler.check, scheduler.command; "
        "print(sorted(m for m in sys.modules if m == 'workers' or m.startswith('workers.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"


def test_check_command_prints_json_without_redis(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        '[[jobs]]\nid = "nightly"\ntask = "reports.build"\ncron = "30 2 * * *"\ntimezone = "Europe/Berlin"\n'
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "APP_ENV": "test",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "HTTP_PORT": "0",
    }  # unreachable on purpose
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_scheduler.py"),
            "--check",
            "--jobs",
            str(jobs),
            "--next",
            "3",
            "--from",
            "2026-03-28T12:00:00+00:00",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "jobs": [
            {
                "id": "nightly",
                "next": [
                    "2026-03-29T03:00:00+02:00",  # spring forward: 02:30 does not exist, runs at 03:00
                    "2026-03-30T02:30:00+02:00",
                    "2026-03-31T02:30:00+02:00",
                ],
            }
        ]
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  - id: x\n    task: demo.sleep\n    cron: '* * *'\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_scheduler.py"), "--check", "--jobs", str(bad)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78
    assert f"{bad}: jobs[0] (x): cron" in done.stderr
