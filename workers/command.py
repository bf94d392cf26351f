"""The worker's command line: ``chronoq worker`` (and ``run_worker.py``, a shim that calls
:func:`main`).

::

    chronoq worker [-Q QUEUES] [-c N] [-P prefork|threads|solo] [--max-tasks-per-child N]
                   [--max-memory-per-child KB] [-l LEVEL] [-n NAME] [--env-file PATH] [--no-supervise]

Every flag overrides the matching ``WORKER_*`` setting. Run it on as many hosts as you like
against one Redis. Unless ``--no-supervise``, the Celery worker runs in a child process started
with :func:`child_argv` and restarted when it ends unasked (:mod:`workers.supervisor`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = """Start a chronoq Celery worker for the cron and ad-hoc queues. Every flag overrides the
matching WORKER_* setting. Run it on as many hosts as you like against one Redis.

Exit status: 0 after SIGTERM or SIGINT (warm shutdown), 78 for a configuration error, 69 if
Redis is unavailable, 70 when its Celery worker keeps ending unasked.
"""
POOLS = ("prefork", "threads", "solo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options, on ``parser``. ``--env-file`` has no default here (see
    :func:`parse_args`), so that ``chronoq --env-file PATH worker`` keeps the top-level value."""
    parser.add_argument("-Q", "--queues", help="comma-separated queues (default: cron_queue,celery_queue)")
    parser.add_argument("-c", "--concurrency", type=int, help="pool size (default: number of CPUs)")
    parser.add_argument("-P", "--pool", choices=POOLS)
    parser.add_argument("--max-tasks-per-child", type=int, help="recycle a pool process after N tasks")
    parser.add_argument(
        "--max-memory-per-child", type=int, metavar="KB", help="recycle a pool process above KB resident"
    )
    parser.add_argument("-l", "--loglevel", help="DEBUG, INFO, WARNING...")
    parser.add_argument("-n", "--hostname", help="worker node name (default chronoq@<host>)")
    parser.add_argument(
        "--env-file", type=Path, default=argparse.SUPPRESS, help="dotenv file (default configs/.env.$APP_ENV)"
    )
    parser.add_argument(
        "--no-supervise",
        action="store_true",
        help="run the Celery worker in this process, not as a child restarted when it ends unasked",
    )


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    from shared.cli_support import parse_command_line

    return parse_command_line(DESCRIPTION, add_arguments, argv, prog)


CHILD_OPTIONS = {
    "queues": "--queues",
    "concurrency": "--concurrency",
    "pool": "--pool",
    "max_tasks_per_child": "--max-tasks-per-child",
    "max_memory_per_child": "--max-memory-per-child",
    "loglevel": "--loglevel",
    "hostname": "--hostname",
    "env_file": "--env-file",
}
"""Every option but ``--no-supervise``, passed on to the supervised child (a test checks that
this names every option)."""


def child_argv(args: argparse.Namespace) -> list[str]:
    """The options of the supervised child: every option given, then ``--no-supervise``."""
    given = [(flag, getattr(args, dest)) for dest, flag in CHILD_OPTIONS.items()]
    return [*(part for flag, value in given if value is not None for part in (flag, str(value))), "--no-supervise"]


def main(argv: list[str], child_command: Sequence[str], prog: str | None = None) -> int:
    """Parse ``argv`` and run; ``child_command`` starts this same command in a new process
    (``[python, "-m", "chronoq", "worker"]``), to which :func:`child_argv` is appended."""
    return run(parse_args(argv, prog), child_command)


def run(args: argparse.Namespace, child_command: Sequence[str]) -> int:
    """Run one worker until it is told to stop: the exit code (0 after SIGTERM or SIGINT, 78 for
    a configuration error, 69 when Redis is unavailable), every error one line on stderr."""
    from shared.cli_support import build_settings, report_errors

    worker = {
        "queues": args.queues,
        "concurrency": args.concurrency,
        "pool": args.pool,
        "max_tasks_per_child": args.max_tasks_per_child,
        "max_memory_per_child_kb": args.max_memory_per_child,
        "hostname": args.hostname,
    }
    settings = build_settings(args.env_file, process="worker", worker=worker, log={"level": args.loglevel})
    if isinstance(settings, int):
        return settings
    from workers.main import main as run_worker

    child = None if args.no_supervise else [*child_command, *child_argv(args)]
    return report_errors("worker", lambda: run_worker(settings, child))
