"""Job specs, and loading them from job files: parse (read + safe parse), then validate.

A job file is YAML (``.yaml``/``.yml``) or TOML (``.toml``) with two optional top-level keys::

    defaults:            # overrides the settings' job defaults for this file only
      timezone: UTC      # also: queue, jitter, coalesce, max_instances, misfire_grace_time
    jobs:
      - id: nightly-report          # unique across all files: letters, digits and . _ : -
        task: reports.build         # a Celery task name, sent by name
        cron: "0 2 * * *"           # exactly one of cron | interval | date
        timezone: Europe/Berlin

TOML uses ``[defaults]`` and ``[[jobs]]`` with the same keys. Defaults resolve as settings, then
the file's ``defaults``, then the job. Validation reports every problem of every file at once,
one line each, naming the file, the job (index and id) and the field.

Reading and safely parsing a file is :mod:`scheduler.jobfiles`; this module validates.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from scheduler.bounds import (
    MAX_CRON_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_DURATION_S,
    MAX_INSTANCES,
    MAX_NAME_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_TIMEZONE_CHARS,
    MAX_YEAR,
    name_repr,
    safe_repr,
    text_problem,
)
from scheduler.cron import parse_cron
from scheduler.jobfiles import parse_job_file
from scheduler.jsonvalues import flat_json_size_bound, json_problem
from shared.errors import ConfigError, JobSpecError
from shared.names import DEFAULT_CRON_QUEUE
from shared.settings import AppSettings, SchedulerSettings

TRIGGER_KEYS = ("cron", "interval", "date")
_ID_RE = re.compile(rf"^[A-Za-z0-9._:-]{{1,{MAX_NAME_CHARS}}}$")
_TASK_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_INTERVAL_UNITS = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


STORED = {"stored": True}
"""``JobSpec.model_validate(..., context=STORED)``: a spec read back from Redis (the registry, a
stored API job). The limits on text added since it was written (description, cron length) are
not applied to it: a job stored by an earlier version keeps loading and running; only new
input (files, code, every create and edit) is held to them."""


def _new(info: ValidationInfo) -> bool:
    return not (info.context or {}).get("stored", False)


def _check_timezone(value: str) -> str:
    if (problem := text_problem(value, MAX_TIMEZONE_CHARS)) is not None:
        raise ValueError(problem)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {safe_repr(value)} (use an IANA name such as Europe/Berlin)") from None
    return value


class _JobOptions(BaseModel):
    """The options a job inherits from the settings and its file's ``defaults`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: StrictStr = "UTC"
    """IANA name; cron fields and naive dates are read in this zone."""
    queue: StrictStr = Field(DEFAULT_CRON_QUEUE, pattern=rf"^\S{{1,{MAX_NAME_CHARS}}}$")
    jitter: float = Field(0.0, ge=0, le=MAX_DURATION_S, strict=True)
    """Seconds: each fire is dispatched 0..jitter s late; the schedule never moves."""
    coalesce: StrictBool = True
    """Several missed fires -> one catch-up dispatch."""
    max_instances: StrictInt = Field(1, ge=1, le=MAX_INSTANCES)
    misfire_grace_time: StrictInt | None = Field(60, gt=0, le=MAX_DURATION_S)
    """Seconds a fire may be late and still run; None: no limit."""
    overlap: Literal["skip", "buffer_one", "allow"] = "skip"
    """With max_instances queued or running fleet-wide: skip the fire, let one wait, or run anyway."""

    _timezone = field_validator("timezone")(_check_timezone)

    @field_validator("queue", mode="before")
    @classmethod
    def _check_queue(cls, value: Any) -> Any:
        if isinstance(value, str) and (problem := text_problem(value, MAX_NAME_CHARS)) is not None:
            raise ValueError(problem)
        return value


class JobDefaults(_JobOptions):
    """Job defaults: the settings', then a file's ``defaults`` block. Field defaults match the settings'."""

    @classmethod
    def from_settings(cls, settings: SchedulerSettings, cron_queue: str) -> JobDefaults:
        """The defaults every job starts from. Raises ConfigError for an invalid ``cron_queue``."""
        fields = settings.model_dump(include={"timezone", "coalesce", "max_instances", "misfire_grace_time", "overlap"})
        try:
            return cls(**fields, jitter=float(settings.jitter), queue=cron_queue)
        except ValidationError as exc:
            raise ConfigError([f"settings: {line}" for line in _describe(exc)]) from None

    def make_spec(self, **fields: Any) -> JobSpec:
        """A JobSpec from code on these defaults; ``source`` defaults to "code". Raises JobSpecError."""
        try:
            return JobSpec.model_validate({**self.model_dump(), "source": "code", **fields})
        except ValidationError as exc:
            raise JobSpecError([f"job {fields.get('id')!r}: {line}" for line in _describe(exc)]) from None


class JobSpec(_JobOptions):
    """One scheduled job: what to send (task, args, kwargs, queue...) and when (one trigger).

    Build from code as ``JobSpec(id="x", task="demo.sleep", interval=10)`` (defaults as in
    :class:`JobDefaults`), with :meth:`JobDefaults.make_spec`, or from files. ``interval``
    (seconds, or a mapping of weeks/days/hours/minutes/seconds) is stored as ``interval_s``;
    naive ``date``/``start_date``/``end_date`` are read in ``timezone``. ``==`` ignores
    ``source`` and compares args/kwargs as JSON, so two specs are equal exactly when the
    schedule and every dispatched message would be the same. Raises ValidationError.
    """

    id: StrictStr
    task: StrictStr
    cron: StrictStr | dict[StrictStr, StrictStr | StrictInt] | None = None
    interval_s: float | None = Field(None, alias="interval")
    date: datetime | None = None
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    priority: StrictInt | None = Field(None, ge=0, le=9)
    expires: float | None = Field(None, gt=0, le=MAX_DURATION_S, strict=True)
    """Seconds after the nominal fire time after which a worker discards the message."""
    time_limit: StrictInt | None = Field(None, gt=0, le=MAX_DURATION_S)
    """Hard time limit of the task, seconds (default: CELERY_TASK_TIME_LIMIT_S)."""
    soft_time_limit: StrictInt | None = Field(None, gt=0, le=MAX_DURATION_S)
    """Soft time limit of the task, seconds (default: CELERY_TASK_SOFT_TIME_LIMIT_S)."""
    start_date: datetime | None = None
    end_date: datetime | None = None
    enabled: StrictBool = True
    description: StrictStr = ""
    pause_after_failures: StrictInt | None = Field(None, ge=1, le=MAX_INSTANCES)
    """After this many consecutive finally-failed fires the job pauses itself fleet-wide."""
    source: StrictStr = "code"
    """Where the spec came from (a file path, "code" or "api"); not part of ``==``."""

    @property
    def kind(self) -> Literal["cron", "interval", "date"]:
        """Which trigger the job uses."""
        if self.cron is not None:
            return "cron"
        return "interval" if self.interval_s is not None else "date"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobSpec):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((self.id, self.task))

    def _identity(self) -> tuple[dict[str, Any], str]:
        # As JSON, because that is what is sent: [1], [1.0] and [True] are equal in Python only.
        payload = json.dumps([self.args, self.kwargs], sort_keys=True)
        return self.model_dump(exclude={"source", "args", "kwargs"}), payload

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if (problem := text_problem(value, MAX_NAME_CHARS)) is not None:
            raise ValueError(problem)
        if not _ID_RE.match(value):
            raise ValueError(f"{safe_repr(value)} must be 1-{MAX_NAME_CHARS} letters, digits or . _ : -")
        if value in (".", ".."):  # URLs drop these path segments: no console or API URL could name the job
            raise ValueError(f"{value!r} cannot name a job (a URL path segment); use letters or digits too")
        return value

    @field_validator("task")
    @classmethod
    def _check_task(cls, value: str) -> str:
        if (problem := text_problem(value, MAX_NAME_CHARS)) is not None:
            raise ValueError(problem)
        if not _TASK_RE.match(value):
            raise ValueError(f"{safe_repr(value)} is not a Celery task name (dotted identifiers such as reports.build)")
        return value

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str, info: ValidationInfo) -> str:
        if _new(info) and (problem := text_problem(value, MAX_DESCRIPTION_CHARS)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("cron", mode="before")
    @classmethod
    def _check_cron(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and _new(info) and (problem := text_problem(value, MAX_CRON_CHARS)) is not None:
            raise ValueError(problem)
        if isinstance(value, dict):
            if len(value) > 8:  # year month day week day_of_week hour minute second
                raise ValueError(f"{len(value)} fields; a cron mapping has at most 8")
            for key, item in value.items():
                if isinstance(item, str) and _new(info) and (problem := text_problem(item, MAX_CRON_CHARS)) is not None:
                    raise ValueError(f"{safe_repr(key)}: {problem}")
                if not isinstance(key, str) or isinstance(item, bool) or not isinstance(item, str | int):
                    raise ValueError(f"{safe_repr(key)}: {safe_repr(item)} must be a string or an integer")
                if isinstance(item, int) and not 0 <= item <= 9999:
                    raise ValueError(f"{key}: {safe_repr(item)} is out of range")
        elif value is not None and not isinstance(value, str):
            raise ValueError("must be a crontab string such as '0 2 * * *' or a mapping such as {second: '*/10'}")
        if value is not None:
            parse_cron(value)
        return " ".join(value.split()) if isinstance(value, str) else value

    @field_validator("interval_s", mode="before")
    @classmethod
    def _check_interval(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, dict):
            if unknown := [unit for unit in value if unit not in _INTERVAL_UNITS]:
                raise ValueError(f"unknown unit {safe_repr(unknown[0])} (use {', '.join(_INTERVAL_UNITS)})")
            seconds = sum(_seconds(amount, f"{unit} ") * _INTERVAL_UNITS[unit] for unit, amount in value.items())
        else:
            seconds = _seconds(value, "")
        if seconds <= 0:
            raise ValueError(f"must be positive, got {safe_repr(value)}")
        if seconds > MAX_DURATION_S:
            raise ValueError(f"must be at most {MAX_DURATION_S} seconds (ten years), got {safe_repr(value)}")
        return seconds

    @field_validator("date", "start_date", "end_date", mode="before")
    @classmethod
    def _check_datetime_type(cls, value: Any) -> Any:
        # Pydantic would read a bare number as a Unix timestamp: a typo, not a date.
        if value is not None and not isinstance(value, str | date):
            raise ValueError(f"must be a date-time such as 2026-12-01T09:00:00+01:00, got {safe_repr(value)}")
        return value

    @field_validator("date", "start_date", "end_date")
    @classmethod
    def _localise(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        zone = info.data.get("timezone")  # absent when the timezone itself is invalid
        if value is None or zone is None:
            return value
        if value.year >= MAX_YEAR:
            raise ValueError(f"{value.isoformat()} is too far ahead (before the year {MAX_YEAR}, please)")
        tz = ZoneInfo(zone)
        value = (value.replace(tzinfo=tz) if value.tzinfo is None else value).astimezone(UTC).astimezone(tz)
        if info.field_name != "date" and info.data.get("date") is not None:
            raise ValueError("applies to cron and interval jobs, not to a date job")
        start = info.data.get("start_date")
        if info.field_name == "end_date" and start is not None and value < start:
            raise ValueError(f"{value.isoformat()} is before start_date {start.isoformat()}")
        return value

    @field_validator("args", "kwargs", mode="before")
    @classmethod
    def _check_json(cls, value: Any, info: ValidationInfo) -> Any:
        expected = list if info.field_name == "args" else dict
        value = list(value) if isinstance(value, tuple) and expected is list else value
        if not isinstance(value, expected):
            raise ValueError(f"must be a {'list' if expected is list else 'mapping'}, got {type(value).__name__}")
        if flat_json_size_bound(value) is None and (problem := json_problem(value, "")) is not None:
            raise ValueError(problem)
        return value

    @field_validator("kwargs")
    @classmethod
    def _check_size(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        args = info.data.get("args", [])
        args_bound, kwargs_bound = flat_json_size_bound(args), flat_json_size_bound(value)
        if args_bound is not None and kwargs_bound is not None and args_bound + kwargs_bound + 4 <= MAX_PAYLOAD_BYTES:
            return value  # small for sure: no need to encode it to know
        size = len(json.dumps([args, value]).encode())
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"args and kwargs are {size} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES}")
        return value

    @model_validator(mode="after")
    def _check_trigger(self) -> JobSpec:
        if (problem := trigger_problem(self.cron, self.interval_s, self.date)) is not None:
            raise ValueError(problem)
        return self


def trigger_problem(*triggers: object) -> str | None:
    """The problem when not exactly one of cron, interval, date (in that order) is not None."""
    given = [key for key, value in zip(TRIGGER_KEYS, triggers, strict=True) if value is not None]
    if len(given) == 1:
        return None
    return f"needs exactly one of cron, interval or date, got {' and '.join(given) if given else 'none'}"


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"{what}must be a number of seconds or a mapping such as {{minutes: 5}}, got {safe_repr(value)}"
        )
    if abs(value) > MAX_DURATION_S:  # before float(): a 400-digit integer overflows it
        raise ValueError(f"{what}must be at most {MAX_DURATION_S} seconds (ten years), got {safe_repr(value)}")
    return float(value)


def validate_job_documents(docs: list[tuple[Path, dict[str, Any]]], defaults: JobDefaults) -> list[JobSpec]:
    """Validate parsed job files (from :func:`parse_job_file`) into specs, in file order.

    Raises one JobSpecError listing every problem of every file, one line each naming the
    file, the job (``jobs[3] (nightly-report)``) and the field. Ids must be unique across all
    documents; a duplicate names both places.
    """
    problems: list[str] = []
    specs: list[JobSpec] = []
    first_use: dict[str, str] = {}
    for path, doc in docs:
        unknown = [key for key in doc if key not in ("defaults", "jobs")]
        problems += [f"{path}: unknown top-level key {key!r} (allowed: defaults, jobs)" for key in unknown]
        file_defaults = defaults
        if (raw_defaults := doc.get("defaults")) is not None:
            try:
                if not isinstance(raw_defaults, dict):
                    raise ValueError
                file_defaults = JobDefaults.model_validate({**defaults.model_dump(), **raw_defaults})
            except ValidationError as exc:
                problems += [f"{path}: {line}" for line in _describe(exc, "defaults")]
            except ValueError:
                problems.append(f"{path}: defaults: must be a mapping")
        jobs = [] if doc.get("jobs") is None else doc["jobs"]
        if not isinstance(jobs, list):
            problems.append(f"{path}: jobs: must be a list of jobs, not a {type(jobs).__name__}")
            continue
        base = {**file_defaults.model_dump(), "source": str(path)}
        for index, job in enumerate(jobs):
            place = f"{path}: jobs[{index}]"
            if not isinstance(job, dict):
                problems.append(f"{place}: must be a mapping with id, task and a trigger (got {type(job).__name__})")
                continue
            job_id = job.get("id")
            found: list[str] = []
            if "source" in job:
                found.append("unknown key 'source'")
            try:
                specs.append(JobSpec.model_validate({**base, **job, "source": base["source"]}))
            except ValidationError as exc:
                # Checked here as well: pydantic skips the model-level check once a field failed.
                if (problem := trigger_problem(*(job.get(key) for key in TRIGGER_KEYS))) is not None:
                    found.append(problem)
                found += _describe(exc)
            if isinstance(job_id, str):
                if job_id in first_use:
                    found.append(f"id {name_repr(job_id)} is already used by {first_use[job_id]}")
                first_use.setdefault(job_id, place)
            shown = (
                job_id[:MAX_NAME_CHARS] + ("..." if len(job_id) > MAX_NAME_CHARS else "")
                if isinstance(job_id, str)
                else "no id"
            )
            label = f"{place} ({shown})"
            problems += [f"{label}: {line}" for line in dict.fromkeys(found)]
    if problems:
        raise JobSpecError(problems)
    return specs


def load_job_specs(paths: Sequence[Path], settings: SchedulerSettings, cron_queue: str) -> list[JobSpec]:
    """Parse and validate job files on the settings' defaults; no network, nothing imported.

    Raises JobSpecError listing every problem of every file (a missing file is one of them).
    """
    defaults = JobDefaults.from_settings(settings, cron_queue)
    problems: list[str] = []
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in paths:
        try:
            docs.append((path, parse_job_file(path, settings.job_file_max_bytes)))
        except JobSpecError as exc:
            problems += exc.problems
    try:
        specs = validate_job_documents(docs, defaults)
    except JobSpecError as exc:
        problems += exc.problems
    if problems:
        raise JobSpecError(problems)
    return specs


def time_limit_problems(specs: Sequence[JobSpec], settings: AppSettings) -> list[str]:
    """One line per job whose own ``time_limit`` plus ``SCHEDULER_SLOT_MARGIN_S`` does not stay
    below ``CELERY_VISIBILITY_TIMEOUT_S``, naming the source, the job and the field; empty if
    all fit. (The settings' own limit is checked when they load.) A fire of such a job that
    runs past its run lease is delivered a second time while the first is still running.
    """
    visibility, margin = settings.celery.visibility_timeout_s, settings.scheduler.slot_margin_s
    return [
        f"{spec.source}: job {spec.id!r}: time_limit: {spec.time_limit} s + SCHEDULER_SLOT_MARGIN_S ({margin}) "
        f"must be below CELERY_VISIBILITY_TIMEOUT_S ({visibility}); lower it or raise the visibility timeout"
        for spec in specs
        if spec.time_limit is not None and spec.time_limit + margin >= visibility
    ]


def _describe(exc: ValidationError, scope: str = "") -> list[str]:
    """One line per problem: ``field: message``, ``scope.field: message`` or ``scope: message``."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden":
            field, message = "", f"unknown key {loc[-1]!r}"
        else:
            field = f"cron {safe_repr(error['input'])}" if loc[:1] == ["cron"] else ".".join(loc)
            message = "missing" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
            if error["type"] not in ("value_error", "missing"):  # pydantic's own wording: show the value
                message = f"{message[:1].lower()}{message[1:]} (got {safe_repr(error['input'])})"
        field = ".".join(part for part in (scope, field) if part)
        lines.append(f"{field}: {message}" if field else message)
    return lines
