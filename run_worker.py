#!/usr/bin/env python3
"""Start a chronoq Celery worker: ``python run_worker.py [-Q QUEUES] [--concurrency N] ...``.

Every flag overrides the matching ``WORKER_*`` setting. Run it on as many hosts as you like
against one Redis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-Q", "--queues", help="comma-separated queues (default: cron_queue,celery_queue)")
    parser.add_argument("-c", "--concurrency", type=int, help="pool size (default: number of CPUs)")
    parser.add_argument("-P", "--pool", choices=["prefork", "threads", "solo"])
    parser.add_argument("--max-tasks-per-child", type=int, help="recycle a pool process after N tasks")
    parser.add_argument(
        "--max-memory-per-child", type=int, metavar="KB", help="recycle a pool process above KB resident"
    )
    parser.add_argument("-l", "--loglevel", help="DEBUG, INFO, WARNING...")
    parser.add_argument("-n", "--hostname", help="worker node name (default chronoq@<host>)")
    parser.add_argument("--env-file", type=Path, help="dotenv file (default configs/.env.$APP_ENV)")
    parser.add_argument(
        "--no-supervise",
        action="store_true",
        help="run the Celery worker in this process, not as a child restarted when it ends unasked",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from shared.cli_support import build_settings

    args = parse_args(argv)
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
    import workers
    from shared.cli_support import report_errors

    child = None if args.no_supervise else [sys.executable, str(Path(__file__).resolve()), *argv, "--no-supervise"]
    return report_errors("worker", lambda: workers.main(settings, child))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
