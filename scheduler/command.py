"""The scheduler daemon's command line: ``chronoq scheduler`` (and ``run_scheduler.py``, a shim
that calls :func:`main`).

::

    chronoq scheduler [--jobs PATH]... [--demo] [--env-file PATH] [--watch] [--no-worker | --worker] [--web]
    chronoq scheduler --check [--jobs PATH]... [--demo] [--next N] [--from ISO-TIME] [--json]

``--check`` validates the job files and prints each job's next fire times without connecting
to Redis. ``--demo`` adds the demo jobs shipped in the package (:data:`DEMO_JOBS`, the same
file as the checkout's ``configs/jobs.yaml``), so an installed chronoq runs its demo from any
directory.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from importlib.resources import files
from pathlib import Path

DESCRIPTION = """Run the chronoq scheduler: it fires the jobs of the job files (and of TASK_MODULES)
into their Celery queues. Without REDIS_URL it uses the embedded Redis and starts a local worker.

--check validates the job files and prints each job's next fire times without connecting to
Redis. --demo runs the demo jobs shipped in the package (the checkout's configs/jobs.yaml).
Exit status: 0 after SIGTERM or SIGINT, 78 for a configuration error, 69 if Redis is unavailable.
"""
DEFAULT_JOBS = Path("configs/jobs.yaml")
"""Read from the working directory when neither ``--jobs`` nor ``--demo`` is given."""
DEMO_JOBS = Path(str(files("scheduler") / "demo_jobs.yaml"))
"""The demo jobs (package data; a copy of ``configs/jobs.yaml``, kept equal by a test)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduler's options, on ``parser``. ``--env-file`` has no default here (see
    :func:`parse_args`), so that ``chronoq --env-file PATH scheduler`` keeps the top-level value."""
    parser.add_argument(
        "--jobs",
        type=Path,
        action="append",
        metavar="PATH",
        help=f"a YAML or TOML job file; repeatable (default: {DEFAULT_JOBS}, unless --demo)",
    )
    parser.add_argument("--demo", action="store_true", help="also run the demo jobs shipped in the package")
    parser.add_argument(
        "--env-file", type=Path, default=argparse.SUPPRESS, help="dotenv file (default configs/.env.$APP_ENV)"
    )
    parser.add_argument("--watch", action="store_true", help="reload the job files when they change")
    parser.add_argument("--no-worker", action="store_true", help="do not start a local worker with embedded Redis")
    parser.add_argument(
        "--worker", action="store_true", help="start a local worker even with REDIS_URL or REDIS_SENTINELS set"
    )
    parser.add_argument("--web", action="store_true", help="also start the web console (chronoq web; WEB_* settings)")
    check = parser.add_argument_group("validation only (no Redis)")
    check.add_argument("--check", action="store_true", help="validate the job files and print the next fire times")
    check.add_argument("--next", type=int, default=5, metavar="N", help="how many fire times per job (default 5)")
    check.add_argument(
        "--from",
        dest="after",
        type=datetime.fromisoformat,
        metavar="ISO-TIME",
        help="preview fires after this instant (default: now)",
    )
    check.add_argument("--json", action="store_true", help="print JSON")


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    from shared.cli_support import parse_command_line

    return parse_command_line(DESCRIPTION, add_arguments, argv, prog)


def job_files(args: argparse.Namespace) -> list[Path]:
    """``--jobs`` in order, then the demo jobs with ``--demo``; ``configs/jobs.yaml`` when neither."""
    given: list[Path] = list(args.jobs or [])
    if args.demo:
        given.append(DEMO_JOBS)
    return given or [DEFAULT_JOBS]


def main(argv: list[str], prog: str | None = None) -> int:
    """Parse ``argv`` and run: the exit code (0 after SIGTERM or SIGINT, 78 for a configuration
    error, 69 when Redis is unavailable), every error one line on stderr."""
    return run(parse_args(argv, prog))


def run(args: argparse.Namespace) -> int:
    from shared.cli_support import report_errors

    return report_errors("scheduler", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from shared.cli_support import build_settings

    settings = build_settings(args.env_file, process="scheduler")
    if isinstance(settings, int):
        return settings
    jobs = job_files(args)
    if args.check:
        from scheduler.check import run_check

        return run_check(
            jobs,
            settings.scheduler,
            settings.celery.cron_queue,
            args.next,
            args.after,
            args.json,
            sys.stdout,
            sys.stderr,
        )
    from scheduler.service import ServiceOptions, serve

    local_worker = False if args.no_worker else (True if args.worker else None)
    options = ServiceOptions(job_files=jobs, watch=args.watch, local_worker=local_worker)
    if not args.web:
        return serve(settings, options)
    from scheduler.companion import web_console

    with web_console(str(args.env_file) if args.env_file else None):
        return serve(settings, options)
