"""The body of ``--check``: validate job files offline and preview each job's next fire times."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from scheduler.specs import JobSpec, load_job_specs
from scheduler.triggers import describe_trigger, next_fire_times
from shared.errors import EX_CONFIG, ConfigError
from shared.settings import SchedulerSettings


def run_check(
    paths: Sequence[Path],
    settings: SchedulerSettings,
    cron_queue: str,
    count: int,
    after: datetime | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Validate ``paths`` and print each job's next ``count`` fire times strictly after ``after``.

    Touches no Redis and no network. ``after`` None means now; a naive ``after`` is UTC. Text mode
    prints one block per job; ``as_json`` prints exactly
    ``{"jobs": [{"id": ..., "next": ["<ISO-8601 with offset>", ...]}]}`` (times in the job's
    zone; a disabled job has ``"next": []``). When any file is invalid, every problem goes to
    ``err``, one per line, and nothing to ``out``.

    Returns 0 when all files are valid, else ``EX_CONFIG`` (78).
    """
    try:
        specs = load_job_specs(paths, settings, cron_queue)
    except ConfigError as exc:  # JobSpecError, or settings that make no valid defaults
        for problem in exc.problems:
            print(problem, file=err)
        print(f"{len(exc.problems)} problem(s) found; nothing was scheduled", file=err)
        return EX_CONFIG
    when = datetime.now(UTC) if after is None else after if after.tzinfo else after.replace(tzinfo=UTC)
    previews = [(spec, next_fire_times(spec, when, count) if spec.enabled else []) for spec in specs]
    if as_json:
        jobs = [{"id": spec.id, "next": [fire.isoformat() for fire in fires]} for spec, fires in previews]
        json.dump({"jobs": jobs}, out)
        out.write("\n")
        return 0
    for spec, fires in previews:
        _print_block(spec, fires, out)
    print(f"{len(specs)} job(s) in {len(paths)} file(s) are valid; times after {when.isoformat()}", file=out)
    return 0


def _print_block(spec: JobSpec, fires: list[datetime], out: TextIO) -> None:
    print(f"{spec.id}  ({spec.source})", file=out)
    print(f"  task      {spec.task} -> queue {spec.queue}", file=out)
    print(f"  schedule  {describe_trigger(spec)}", file=out)
    if not spec.enabled:
        print("  disabled  (never fires until enabled)", file=out)
    elif not fires:
        print("  next      none: the schedule has ended", file=out)
    for index, fire in enumerate(fires):
        label = "next" if index == 0 else ""
        utc = fire.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"  {label:<9} {fire.isoformat()}  ({utc})", file=out)
    print(file=out)
