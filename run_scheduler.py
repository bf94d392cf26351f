#!/usr/bin/env python3
"""Run the chronoq scheduler: ``python run_scheduler.py [--jobs PATH]... [--watch]``.

``--check`` validates the job files and prints each job's next fire times without connecting
to Redis.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--jobs",
        type=Path,
        action="append",
        metavar="PATH",
        help="a YAML or TOML job file; repeatable (default: configs/jobs.yaml)",
    )
    parser.add_argument("--env-file", type=Path, help="dotenv file (default configs/.env.$APP_ENV)")
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
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from shared.cli_support import report_errors

    args = parse_args(argv)
    return report_errors("scheduler", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from shared.cli_support import build_settings

    settings = build_settings(args.env_file, process="scheduler")
    if isinstance(settings, int):
        return settings
    jobs = args.jobs or [Path("configs/jobs.yaml")]
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
