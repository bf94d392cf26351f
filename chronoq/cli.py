"""The ``chronoq`` command: the two daemons and the operator commands.

::

    chronoq scheduler [--jobs PATH]... [--demo] [--watch] [--no-worker | --worker] [--web]
    chronoq scheduler --check [--jobs PATH]... [--next N] [--from ISO-TIME] [--json]
    chronoq worker [-Q QUEUES] [-c N] [-P prefork|threads|solo] [-n NAME] ...
    chronoq health | status | web | task ... | jobs ...      (chronoq COMMAND --help)

``chronoq scheduler`` and ``chronoq worker`` take the options of ``run_scheduler.py`` and
``run_worker.py`` (:mod:`scheduler.command`, :mod:`workers.command`); the operator commands are
:mod:`scheduler.cli`. ``--env-file`` may come before or after the command. Every error is one
line on stderr and an exit code (78 configuration, 69 Redis unavailable), never a traceback.

For the daemons, the working directory is on the import path (last), as it is for ``python -m``
and ``celery worker``: ``TASK_MODULES`` found there import.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from chronoq import __version__
from scheduler import cli as operator_cli
from scheduler import command as scheduler_command
from workers import command as worker_command

DAEMONS = ("scheduler", "worker")
USAGE = """Run chronoq: the scheduler, workers, and the operator commands.

    chronoq scheduler [--jobs PATH]... [--demo] [--watch] [--no-worker | --worker] [--web]
    chronoq scheduler --check [--jobs PATH]... [--demo] [--next N] [--from ISO-TIME] [--json]
    chronoq worker [-Q QUEUES] [-c N] [-P prefork|threads|solo] [-n NAME] ...
"""


def parser() -> argparse.ArgumentParser:
    def add_daemons(commands: Any) -> None:
        for name, command, what in (
            ("scheduler", scheduler_command, "run the scheduler daemon (what run_scheduler.py runs)"),
            ("worker", worker_command, "run a Celery worker for chronoq's queues (what run_worker.py runs)"),
        ):
            daemon = commands.add_parser(
                name, help=what, description=command.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
            )
            command.add_arguments(daemon)

    chronoq = operator_cli._parser(USAGE + (operator_cli.__doc__ or "").partition("::\n")[2], add_daemons)
    chronoq.add_argument("--version", action="version", version=f"chronoq {__version__}")
    return chronoq


def child_command() -> list[str]:
    """How a supervising ``chronoq worker`` starts its Celery worker: this interpreter, without
    the working directory put first on the path (``-P``; :func:`main` adds it last)."""
    return [sys.executable, "-P", "-m", "chronoq", "worker"]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in DAEMONS:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.append(cwd)
    if args.command == "scheduler":
        return scheduler_command.run(args)
    if args.command == "worker":
        return worker_command.run(args, child_command())
    return operator_cli.execute(args)
