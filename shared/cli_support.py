"""What every entry point does first: settings built once, command-line overrides, logging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.errors import EX_CONFIG, ConfigError
from shared.logging import configure_logging
from shared.settings import AppSettings, describe_errors


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
    configure_logging(settings, process=process)
    return settings
