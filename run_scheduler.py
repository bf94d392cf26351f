#!/usr/bin/env python3
"""Run the chronoq scheduler from a checkout: ``python run_scheduler.py [--jobs PATH]... [--watch]``.

The same command as ``chronoq scheduler`` (:mod:`scheduler.command`), kept for checkouts and
scripts that start it by path.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from scheduler.command import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
