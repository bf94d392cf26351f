#!/usr/bin/env python3
"""Start a chronoq Celery worker from a checkout: ``python run_worker.py [-Q QUEUES] [--concurrency N] ...``.

The same command as ``chronoq worker`` (:mod:`workers.command`), kept for checkouts and scripts
that start it by path.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from workers.command import main as run

    # The supervised Celery worker: this same script, so a checkout needs no installed package.
    return run(argv, [sys.executable, str(Path(__file__).resolve())])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
