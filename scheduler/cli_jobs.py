"""``chronoq jobs add | edit | delete | export | apply | backfill``: API jobs from the command line.

Each is a face of :class:`scheduler.jobops.JobOps`, like the Python client. Exit codes: 0 done,
1 refused (unknown job, a version conflict, a job owned by a file or code, a backfill too
large), 78 an invalid spec or file (one line per problem naming job and field), 69 Redis
unavailable; nothing is stored on any of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from scheduler.api import AsyncClient
from scheduler.bounds import MAX_DOCUMENT_BYTES
from scheduler.jobfiles import parse_document, parse_job_file, parse_json_document
from scheduler.jobmodels import ApplyPlan, BackfillResult
from scheduler.jobstore import JobRecord
from shared.errors import EX_CONFIG, JobChangeError, JobSpecError, UnknownJobError
from shared.settings import AppSettings

ACTIONS = ("add", "edit", "delete", "export", "apply", "backfill")
_FLAG_KEYS = ("id", "task", "cron", "interval", "date", "timezone", "queue", "priority", "description")
_JSON_FLAG_KEYS = ("args", "kwargs")


def add_commands(jobs: Any, command: Callable[[Any, str, str], argparse.ArgumentParser]) -> None:
    """The API job commands, under ``chronoq jobs``."""
    add = command(jobs, "add", "create a job at runtime (flags, or --spec with a YAML/JSON mapping)")
    add.add_argument("--spec", help="the job as a YAML or JSON mapping; @FILE reads it from a file")
    for key in _FLAG_KEYS:
        add.add_argument(f"--{key}")
    for key in _JSON_FLAG_KEYS:
        add.add_argument(f"--{key}", help="JSON")
    add.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other job key (YAML value)")
    edit = command(jobs, "edit", "change a job created at runtime")
    edit.add_argument("job_id")
    edit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", required=True)
    delete = command(jobs, "delete", "delete a job created at runtime (every replica stops it within 1 s)")
    delete.add_argument("job_id")
    for sub in (edit, delete):
        sub.add_argument("--expected-version", type=int, help="refuse if the job changed since this version")
    export = command(jobs, "export", "every job as one job file (JSON)")
    export.add_argument("--output", type=Path, help="write to this file instead of stdout")
    apply = command(jobs, "apply", "make the API jobs equal a job file, printing the difference")
    apply.add_argument("file", type=Path)
    apply.add_argument("--prune", action="store_true", help="delete API jobs that are not in the file")
    apply.add_argument("--dry-run", action="store_true", help="print the difference, change nothing")
    backfill = command(jobs, "backfill", "dispatch the fires of a past range that did not run")
    backfill.add_argument("job_id")
    backfill.add_argument("--from", dest="start", type=datetime.fromisoformat, required=True, metavar="ISO-TIME")
    backfill.add_argument("--to", dest="end", type=datetime.fromisoformat, required=True, metavar="ISO-TIME")
    backfill.add_argument("--overlap", choices=("allow", "sequential"), default="allow")
    for sub in (add, edit, delete, apply, backfill):
        sub.add_argument("--note", default="", help="recorded in the audit trail")


def _value(text: str, what: str) -> Any:
    return parse_document(text, what) if text.strip() else ""


def _assignments(pairs: list[str]) -> dict[str, Any]:
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise JobSpecError(f"--set {pair!r}: expected KEY=VALUE")
        changes[key.strip()] = _value(value, f"--set {key.strip()}")
    return changes


def _spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if args.spec:
        document = parse_document(_spec_text(args.spec), "--spec")
        if not isinstance(document, dict):
            raise JobSpecError("--spec: must be a mapping with id, task and a trigger")
    for key in _FLAG_KEYS:
        if (value := getattr(args, key)) is not None:
            document[key] = (
                value
                if key in ("id", "task", "cron", "queue", "timezone", "description")
                else _value(value, f"--{key}")
            )
    for key in _JSON_FLAG_KEYS:
        if (value := getattr(args, key)) is not None:
            document[key] = parse_json_document(value, f"--{key}")
    document.update(_assignments(args.set))
    return document


def _spec_text(spec: str) -> str:
    """``--spec``'s text, or the file it names (``@FILE``) read up to the document limit."""
    if not spec.startswith("@"):
        return spec
    path = Path(spec[1:])
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_DOCUMENT_BYTES + 1)  # never a huge file whole
    except OSError as exc:
        raise JobSpecError(f"--spec {path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise JobSpecError(f"--spec {path}: larger than {MAX_DOCUMENT_BYTES} bytes, the limit of one job's spec")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobSpecError(f"--spec {path}: not UTF-8 text (byte {exc.start})") from None


async def run(args: argparse.Namespace, settings: AppSettings) -> int:
    """One API job command; errors become one line and an exit code (nothing stored)."""
    async with AsyncClient(settings) as client:
        try:
            return await _run(args, client)
        except JobSpecError as exc:
            return _fail(args, exc.problems, EX_CONFIG)
        except (JobChangeError, UnknownJobError) as exc:
            return _fail(args, [str(exc)], 1)


def _fail(args: argparse.Namespace, problems: list[str], code: int) -> int:
    if args.json:
        print(json.dumps({"error": problems}))
    for line in problems:
        print(f"chronoq: {line}", file=sys.stderr)
    return code


async def _run(args: argparse.Namespace, client: AsyncClient) -> int:
    result: Any
    if args.action == "add":
        result = await client.create(_spec_from_args(args), note=args.note)
    elif args.action == "edit":
        changes = _assignments(args.set)
        result = await client.update(args.job_id, changes, expected_version=args.expected_version, note=args.note)
    elif args.action == "delete":
        result = await client.delete(args.job_id, expected_version=args.expected_version, note=args.note)
        print(json.dumps({"job": args.job_id, "deleted": True}) if args.json else f"{args.job_id}: deleted")
        return 0
    elif args.action == "export":
        text = json.dumps(await client.export(), indent=1)
        if args.output:
            args.output.write_text(text + "\n")
        else:
            print(text)
        return 0
    elif args.action == "apply":
        document = parse_job_file(args.file, client.settings.scheduler.job_file_max_bytes)
        result = await client.apply(
            document, prune=args.prune, dry_run=args.dry_run, note=args.note, label=str(args.file)
        )
    else:
        result = await client.backfill(args.job_id, args.start, args.end, overlap=args.overlap, note=args.note)
    print(result.model_dump_json() if args.json else _describe(result))
    return 0


def _describe(result: JobRecord | ApplyPlan | BackfillResult) -> str:
    if isinstance(result, JobRecord):
        return f"{result.id}: version {result.version} ({result.source}) {json.dumps(result.spec)}"
    if isinstance(result, ApplyPlan):
        counts = f"create {len(result.create)}, update {len(result.update)}, delete {len(result.delete)}"
        head = f"{'applied' if result.applied else 'dry run'}: {counts}, unchanged {len(result.unchanged)}"
        return "\n".join([*result.diff, head])
    lines = [f"{result.job}: backfill ({result.overlap}): {len(result.dispatched)} dispatched"]
    lines += [f"  dispatched {at}" for at in result.dispatched]
    lines += [f"  queued     {at}" for at in result.queued]
    lines += [f"  decided    {at} (already)" for at in result.already_decided]
    return "\n".join(lines)
