"""What every entry point does first (settings built once, command-line overrides, logging)
and last (every error is one line on stderr and an exit code, never a traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.errors import EX_CONFIG, EX_UNAVAILABLE, ChronoqError, ConfigError
from shared.logging import configure_logging
from shared.settings import AppSettings, describe_errors


def parse_command_line(
    description: str, add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str], prog: str | None
) -> argparse.Namespace:
    """A daemon's command line (``chronoq scheduler|worker``, their ``run_*.py`` shims)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(env_file=None)
    add_arguments(parser)
    return parser.parse_args(argv)


def apply_overrides(settings: AppSettings, **groups: dict[str, Any]) -> AppSettings:
    """Return ``settings`` with the non-None values of ``groups`` (``worker={"pool": ...}``)
    validated into their groups; raises :class:`ConfigError` naming the setting."""
    update: dict[str, Any] = {}
    for name, values in groups.items():
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        group = getattr(settings, name)
        try:
            update[name] = type(group).model_validate({**group.model_dump(), **values})
        except ValidationError as exc:
            raise ConfigError([f"{name.upper()}_{line}" for line in describe_errors(exc)]) from None
    return settings.model_copy(update=update) if update else settings


def build_settings(env_file: Path | None, *, process: str, **groups: dict[str, Any]) -> AppSettings | int:
    """Load settings, apply command-line overrides and configure logging.

    Returns the settings, or the exit code 78 after printing every problem to stderr.
    """
    try:
        settings = apply_overrides(AppSettings.load(env_file), **groups)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"chronoq {process}: {line}", file=sys.stderr)
        return EX_CONFIG
    try:
        configure_logging(settings, process=process)
    except OSError as exc:
        print(f"chronoq {process}: LOG_FILE: cannot write {settings.log.file}: {exc.strerror or exc}", file=sys.stderr)
        return EX_CONFIG
    return settings


def exit_code(error: ChronoqError) -> int:
    """78 when retrying cannot help (settings, credentials, TLS), else 69 (Redis unavailable)."""
    from shared.redis_checks import is_config_error

    return EX_CONFIG if is_config_error(error) else EX_UNAVAILABLE


def report_errors(process: str, body: Callable[[], int]) -> int:
    """Run an entry point's ``body`` and turn whatever escapes it into one line per problem on
    stderr and an exit code: :func:`exit_code` for chronoq's own errors, 69 for a Redis or
    network error that got past the start-up checks, 78 for a configured path or module that
    is not there, 1 for anything else (a task's own error re-raised by ``chronoq task
    result``, a wait that timed out). URL credentials are masked."""
    import redis
    from kombu.exceptions import OperationalError

    from shared.redaction import redact_text

    def say(message: str) -> None:
        for line in redact_text(message).splitlines() or [""]:
            print(f"chronoq {process}: {line}", file=sys.stderr)

    try:
        return body()
    except ChronoqError as exc:
        say(str(exc))
        return exit_code(exc)
    except (redis.RedisError, OperationalError) as exc:
        say(f"redis unavailable: {exc}")
        return EX_UNAVAILABLE
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        say(f"{exc.strerror or exc}: {exc.filename}")  # a configured path (REDIS_EMBEDDED_DIR...)
        return EX_CONFIG
    except ImportError as exc:  # TASK_MODULES
        say(f"cannot import {exc.name or ''}: {exc} (check TASK_MODULES and PYTHONPATH)")
        return EX_CONFIG
    except OSError as exc:
        say(str(exc))
        return EX_UNAVAILABLE
    except Exception as exc:  # an entry point never ends in a traceback
        say(f"{type(exc).__name__}: {exc}")
        return 1
