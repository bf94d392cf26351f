"""The ``chronoq`` command's daemons: ``chronoq scheduler`` and ``chronoq worker`` take exactly
the options of ``run_scheduler.py`` and ``run_worker.py``; the supervised worker's child gets
every option; ``--env-file`` works before and after the command; ``--demo`` is the demo file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chronoq.cli import parser
from scheduler import command as scheduler_command
from tests.conftest import ROOT
from workers import command as worker_command

WORKER_ARGV = ["-Q", "a,b", "-c", "3", "-P", "threads", "--max-tasks-per-child", "7", "--max-memory-per-child", "9000",
               "-l", "DEBUG", "-n", "w1@%h", "--env-file", "x.env"]  # fmt: skip
SCHEDULER_ARGV = ["--jobs", "a.yaml", "--jobs", "b.toml", "--demo", "--env-file", "x.env", "--watch", "--no-worker",
                  "--web", "--check", "--next", "3", "--from", "2026-01-01T00:00:00+00:00", "--json"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "argv", "shim"),
    [("scheduler", SCHEDULER_ARGV, scheduler_command.parse_args), ("worker", WORKER_ARGV, worker_command.parse_args)],
)
def test_the_chronoq_commands_parse_as_the_shims_do(name: str, argv: list[str], shim: object) -> None:
    assert callable(shim)
    for given in ([], argv):
        assert vars(parser().parse_args([name, *given])) == {"command": name, **vars(shim(given))}


def test_env_file_before_or_after_the_command() -> None:
    for name in ("scheduler", "worker"):
        assert parser().parse_args(["--env-file", "top.env", name]).env_file == Path("top.env")
        assert parser().parse_args([name, "--env-file", "sub.env"]).env_file == Path("sub.env")
        assert parser().parse_args([name]).env_file is None


def test_the_supervised_child_gets_every_worker_option() -> None:
    assert set(vars(worker_command.parse_args([]))) == {*worker_command.CHILD_OPTIONS, "no_supervise"}
    given = worker_command.parse_args(WORKER_ARGV)
    child = worker_command.parse_args(worker_command.child_argv(given))
    assert vars(child) == {**vars(given), "no_supervise": True}
    assert worker_command.child_argv(worker_command.parse_args([])) == ["--no-supervise"]


def test_demo_jobs_are_the_checkout_demo_file_and_combine_with_jobs() -> None:
    assert scheduler_command.DEMO_JOBS.read_bytes() == (ROOT / "configs" / "jobs.yaml").read_bytes()
    files = scheduler_command.job_files
    assert files(scheduler_command.parse_args([])) == [Path("configs/jobs.yaml")]
    assert files(scheduler_command.parse_args(["--demo"])) == [scheduler_command.DEMO_JOBS]
    assert files(scheduler_command.parse_args(["--jobs", "a.yaml", "--demo"])) == [
        Path("a.yaml"),
        scheduler_command.DEMO_JOBS,
    ]


def test_chronoq_scheduler_check_demo_from_any_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chronoq", "scheduler", "--check", "--demo", "--next", "1"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "APP_ENV": "test"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for job in ("demo-heartbeat", "demo-sum-every-minute", "demo-sum-every-15s", "demo-nightly", "demo-launch"):
        assert job in done.stdout
