"""``python -m chronoq ...``: the ``chronoq`` command."""

from __future__ import annotations

import sys

from chronoq.cli import main

if __name__ == "__main__":
    sys.exit(main())
