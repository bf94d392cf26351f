"""Job specs and job files: parsing, every validation problem at once, defaults, safety."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from scheduler.jobfiles import MAX_FILE_BYTES, parse_job_file
from scheduler.jsonvalues import flat_json_size_bound
from scheduler.specs import JobDefaults, JobSpec, load_job_specs, validate_job_documents
from shared.errors import ConfigError, JobSpecError
from shared.settings import SchedulerSettings

SETTINGS = SchedulerSettings(timezone="UTC", jitter=0, coalesce=True, max_instances=1, misfire_grace_time=60)

EXAMPLE_YAML = """\
defaults:
  timezone: UTC
  queue: cron_queue
  jitter: 0
  coalesce: true
  max_instances: 1
  misfire_grace_time: 60
jobs:
  - id: nightly-report
    task: reports.build
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    args: [7]
    kwargs: {fmt: pdf}
  - id: heartbeat
    task: demo.sleep
    interval: 10
  - id: launch
    task: demo.number_sum
    date: "2026-12-01T09:00:00+01:00"
"""

EXAMPLE_TOML = """\
[defaults]
timezone = "UTC"
queue = "cron_queue"
jitter = 0
coalesce = true
max_instances = 1
misfire_grace_time = 60

[[jobs]]
id = "nightly-report"
task = "reports.build"
cron = "0 2 * * *"
timezone = "Europe/Berlin"
args = [7]
kwargs = {fmt = "pdf"}

[[jobs]]
id = "heartbeat"
task = "demo.sleep"
interval = 10

[[jobs]]
id = "launch"
task = "demo.number_sum"
date = 2026-12-01T09:00:00+01:00
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(paths: list[Path]) -> list[str]:
    with pytest.raises(JobSpecError) as caught:
        load_job_specs(paths, SETTINGS, "cron_queue")
    return caught.value.problems


def one_job(body: str) -> str:
    """A YAML file with one job; ``body`` is the job's keys, one per line."""
    return "jobs:\n  - " + "\n    ".join(body.strip().splitlines()) + "\n"


def test_example_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.yaml", EXAMPLE_YAML)
    report, heartbeat, launch = load_job_specs([path], SETTINGS, "cron_queue")
    assert (report.kind, report.cron, report.timezone, report.args, report.kwargs) == (
        "cron",
        "0 2 * * *",
        "Europe/Berlin",
        [7],
        {"fmt": "pdf"},
    )
    assert (heartbeat.kind, heartbeat.interval_s, heartbeat.timezone) == ("interval", 10.0, "UTC")
    assert launch.kind == "date"
    assert launch.date == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert report.source == str(path)
    assert (report.queue, report.jitter, report.coalesce, report.max_instances, report.misfire_grace_time) == (
        "cron_queue",
        0.0,
        True,
        1,
        60,
    )


def test_yaml_and_toml_are_equivalent(tmp_path: Path) -> None:
    from_yaml = load_job_specs([write(tmp_path, "a.yaml", EXAMPLE_YAML)], SETTINGS, "cron_queue")
    from_toml = load_job_specs([write(tmp_path, "b.toml", EXAMPLE_TOML)], SETTINGS, "cron_queue")
    assert from_yaml == from_toml  # == ignores the source
    assert [spec.source for spec in from_yaml] != [spec.source for spec in from_toml]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("", "empty.yaml"),
        ("jobs: []\n", "none.yaml"),
        ("jobs:\n", "null.yaml"),
        ("", "empty.toml"),
        ("# only a comment\n", "comment.yml"),
    ],
)
def test_files_without_jobs_are_valid(tmp_path: Path, text: str, name: str) -> None:
    assert load_job_specs([write(tmp_path, name, text)], SETTINGS, "cron_queue") == []


def test_defaults_resolve_settings_then_file_then_job(tmp_path: Path) -> None:
    settings = SchedulerSettings(
        timezone="Europe/Berlin", jitter=5, coalesce=False, max_instances=2, misfire_grace_time=None
    )
    with_defaults = write(
        tmp_path,
        "a.yaml",
        """\
defaults: {timezone: UTC, queue: reports, jitter: 1.5, misfire_grace_time: 30}
jobs:
  - {id: a1, task: t.a, interval: 5}
  - {id: a2, task: t.a, interval: 5, timezone: Asia/Tokyo, queue: fast, jitter: 0, coalesce: true,
     max_instances: 3, misfire_grace_time: null, priority: 9, expires: 30, enabled: false, description: hi}
""",
    )
    plain = write(tmp_path, "b.yaml", "jobs:\n  - {id: b1, task: t.b, interval: 5}\n")
    a1, a2, b1 = load_job_specs([with_defaults, plain], settings, "cron_q")
    assert (a1.timezone, a1.queue, a1.jitter, a1.coalesce, a1.max_instances, a1.misfire_grace_time) == (
        "UTC",
        "reports",
        1.5,
        False,
        2,
        30,
    )
    assert (a2.timezone, a2.queue, a2.jitter, a2.coalesce, a2.max_instances, a2.misfire_grace_time) == (
        "Asia/Tokyo",
        "fast",
        0.0,
        True,
        3,
        None,
    )
    assert (a2.priority, a2.expires, a2.enabled, a2.description) == (9, 30.0, False, "hi")
    assert (b1.timezone, b1.queue, b1.jitter, b1.coalesce, b1.max_instances, b1.misfire_grace_time) == (
        "Europe/Berlin",
        "cron_q",
        5.0,
        False,
        2,
        None,
    )


@pytest.mark.parametrize(
    ("interval", "seconds"),
    [
        ("10", 10.0),
        ("0.5", 0.5),
        ("{minutes: 5}", 300.0),
        ("{hours: 1, minutes: 30}", 5400.0),
        ("{weeks: 1, days: 1}", 691200.0),
        ("{seconds: 90}", 90.0),
    ],
)
def test_interval_forms(tmp_path: Path, interval: str, seconds: float) -> None:
    path = write(tmp_path, "jobs.yaml", one_job(f"id: x\ntask: t.a\ninterval: {interval}"))
    [spec] = load_job_specs([path], SETTINGS, "cron_queue")
    assert spec.interval_s == seconds


def test_naive_dates_are_read_in_the_jobs_time_zone(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "jobs.yaml",
        one_job(
            "id: x\ntask: t.a\ncron: '0 2 * * *'\ntimezone: Europe/Berlin\nstart_date: 2026-07-01\nend_date: 2026-12-01T10:00:00"
        ),
    )
    [spec] = load_job_specs([path], SETTINGS, "cron_queue")
    assert spec.start_date is not None and spec.end_date is not None
    assert spec.start_date.astimezone(UTC) == datetime(2026, 6, 30, 22, tzinfo=UTC)
    assert spec.end_date.astimezone(UTC) == datetime(2026, 12, 1, 9, tzinfo=UTC)


BAD_JOBS = [
    # (job keys, the field part of the one expected problem)
    ("id: x\ntask: t.a\ncron: '61 * * * *'", "cron '61 * * * *': minute must be 0-59"),
    ("id: x\ntask: t.a\ncron: '* 24 * * *'", "cron '* 24 * * *': hour must be 0-23"),
    ("id: x\ntask: t.a\ncron: '* * * 13 *'", "cron '* * * 13 *': month must be 1-12"),
    ("id: x\ntask: t.a\ncron: '* * *'", "cron '* * *': expected 5 fields"),
    ("id: x\ntask: t.a\ncron: '0 0 31 2 *'", "cron '0 0 31 2 *': never fires"),
    ("id: x\ntask: t.a\ncron: {secnd: '*/10'}", "cron {'secnd': '*/10'}: unknown field 'secnd'"),
    ("id: x\ntask: t.a\ncron: 5", "cron 5: must be a crontab string"),
    ("id: x\ntask: t.a\ncrn: '0 2 * * *'\ninterval: 5", "unknown key 'crn'"),
    ("id: x\ncron: '0 2 * * *'", "task: missing"),
    ("task: t.a\ncron: '0 2 * * *'", "id: missing"),
    ("id: x\ntask: t.a", "needs exactly one of cron, interval or date, got none"),
    (
        "id: x\ntask: t.a\ncron: '0 2 * * *'\ninterval: 5",
        "needs exactly one of cron, interval or date, got cron and interval",
    ),
    ("id: x\ntask: t.a\ncron: '0 2 * * *'\ntimezone: Mars/Base", "timezone: unknown time zone 'Mars/Base'"),
    ("id: x\ntask: t.a\ninterval: 0", "interval: must be positive"),
    ("id: x\ntask: t.a\ninterval: -5", "interval: must be positive"),
    ("id: x\ntask: t.a\ninterval: {mins: 3}", "interval: unknown unit 'mins'"),
    ("id: x\ntask: t.a\ninterval: '10'", "interval: must be a number of seconds"),
    ("id: x\ntask: t.a\ninterval: 5\nargs: [2026-01-01]", "args: [0] is a date, not a JSON value"),
    ("id: x\ntask: t.a\ninterval: 5\nargs: !!set {a: null}", "args: must be a list, got set"),
    ("id: x\ntask: t.a\ninterval: 5\nkwargs: {s: !!set {a: null}}", "kwargs: ['s'] is a set, not a JSON value"),
    ("id: x\ntask: t.a\ninterval: 5\nkwargs: {when: 2026-01-01T00:00:00Z}", "kwargs: ['when'] is a datetime"),
    ("id: x\ntask: t.a\ninterval: 5\nkwargs: {n: .nan}", "kwargs: ['n'] is nan"),
    ("id: x\ntask: t.a\ninterval: 5\nargs: ['" + "a" * 70000 + "']", "kwargs: args and kwargs are 70010 bytes as JSON"),
    ("id: x\ntask: reports build\ninterval: 5", "task: 'reports build' is not a Celery task name"),
    ("id: x\ntask: os.system()\ninterval: 5", "task: 'os.system()' is not a Celery task name"),
    ("id: x\ntask: " + "a" * 201 + "\ninterval: 5", "task: 201 characters; the limit is 200"),
    ("id: x y\ntask: t.a\ninterval: 5", "id: 'x y' must be 1-200 letters"),
    ("id: a/b\ntask: t.a\ninterval: 5", "id: 'a/b' must be 1-200 letters"),
    ("id: '..'\ntask: t.a\ninterval: 5", "id: '..' cannot name a job (a URL path segment)"),
    ("id: '.'\ntask: t.a\ninterval: 5", "id: '.' cannot name a job (a URL path segment)"),
    (
        "id: x\ntask: t.a\ninterval: 5\nstart_date: 2026-02-01\nend_date: 2026-01-01",
        "end_date: 2026-01-01T00:00:00+00:00 is before",
    ),
    ("id: x\ntask: t.a\ninterval: 5\npriority: 10", "priority: input should be less than or equal to 9"),
    ("id: x\ntask: t.a\ninterval: 5\npriority: high", "priority: input should be a valid integer"),
    ("id: x\ntask: t.a\ninterval: 5\ncoalesce: 'yes'", "coalesce: input should be a valid boolean"),
    ("id: x\ntask: t.a\ninterval: 5\nmax_instances: 0", "max_instances: input should be greater than or equal to 1"),
    ("id: x\ntask: t.a\ninterval: 5\nmisfire_grace_time: 0", "misfire_grace_time: input should be greater than 0"),
    ("id: x\ntask: t.a\ninterval: 5\njitter: -1", "jitter: input should be greater than or equal to 0"),
    ("id: x\ntask: t.a\ninterval: 5\nexpires: 0", "expires: input should be greater than 0"),
    ("id: x\ntask: t.a\ndate: 1700000000", "date: must be a date-time"),
    ("id: x\ntask: t.a\ndate: 2026-12-01\nstart_date: 2026-01-01", "start_date: applies to cron and interval jobs"),
    ("id: x\ntask: t.a\ninterval: 5\nsource: me", "unknown key 'source'"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_JOBS)
def test_bad_job_names_file_job_and_field(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path, "jobs.yaml", one_job(body))
    problems = problems_of([path])
    named = body.split("\n", 1)[0].removeprefix("id: ").strip("'")
    job_id = "no id" if not body.startswith("id: ") else named
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: jobs[0] ({job_id}): {expected}")


def test_all_problems_of_all_files_at_once(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "a.yaml",
        """\
jobs:
  - {id: ok, task: t.a, interval: 5}
  - {id: bad-cron, task: t.a, cron: "61 * * * *"}
  - {id: typo, task: t.a, crn: "0 2 * * *", interval: 5}
  - {id: tz, task: t.a, interval: 5, timezone: Mars/Base}
""",
    )
    second = write(tmp_path, "b.toml", '[[jobs]]\nid = "ok"\ntask = "t.b"\ninterval = 0\n')
    missing = tmp_path / "missing.yaml"
    problems = problems_of([first, second, missing])
    assert problems == [
        f"{missing}: no such job file",
        f"{first}: jobs[1] (bad-cron): cron '61 * * * *': minute must be 0-59",
        f"{first}: jobs[2] (typo): unknown key 'crn'",
        f"{first}: jobs[3] (tz): timezone: unknown time zone 'Mars/Base' (use an IANA name such as Europe/Berlin)",
        f"{second}: jobs[0] (ok): interval: must be positive, got 0",
        f"{second}: jobs[0] (ok): id 'ok' is already used by {first}: jobs[0]",
    ]


def test_duplicate_id_within_a_file_names_both_places(tmp_path: Path) -> None:
    path = write(
        tmp_path, "jobs.yaml", "jobs:\n  - {id: a, task: t.a, interval: 5}\n  - {id: a, task: t.b, interval: 6}\n"
    )
    assert problems_of([path]) == [f"{path}: jobs[1] (a): id 'a' is already used by {path}: jobs[0]"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults: {timezone: Mars/Base}\n", "defaults.timezone: unknown time zone 'Mars/Base'"),
        ("defaults: {jiter: 3}\n", "defaults: unknown key 'jiter'"),
        ("defaults: {max_instances: 0}\n", "defaults.max_instances: input should be greater than or equal to 1"),
        ("defaults: [1]\n", "defaults: must be a mapping"),
        ("job: []\n", "unknown top-level key 'job' (allowed: defaults, jobs)"),
        ("jobs: {id: x}\n", "jobs: must be a list of jobs"),
        ("jobs: [5]\n", "jobs[0]: must be a mapping"),
        ("- 1\n- 2\n", "the top level must be a mapping"),
    ],
)
def test_bad_file_structure(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "jobs.yaml", text)
    problems = problems_of([path])
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("jobs.yaml", "jobs:\n  - id: x\n   task: y\n", "line 3: YAML error: "),
        (
            "jobs.yaml",
            "jobs:\n  - {id: x, task: t.a, cron: '0 2 * * *', cron: '0 3 * * *'}\n",
            "line 2: YAML error: duplicate key 'cron'",
        ),
        ("jobs.toml", '[[jobs]]\nid = "x"\ntask = \n', "TOML syntax error: Invalid value (at line 3, column 8)"),
        ("jobs.json", '{"jobs": [}', "line 1: YAML error: "),
        ("jobs.txt", "{}", "unknown file type '.txt': use .yaml, .yml, .json or .toml"),
        ("jobs", "", "unknown file type '(no suffix)'"),
    ],
)
def test_syntax_errors_name_file_and_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(JobSpecError) as caught:
        parse_job_file(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}: {expected}")


def test_json_documents_read_like_yaml_through_the_fast_path(tmp_path: Path) -> None:
    document = {
        "defaults": {"timezone": "Europe/Berlin"},
        "jobs": [{"id": "x", "task": "t.a", "cron": "0 2 * * *", "args": [1, 2.5, None, True], "kwargs": {"k": "v"}}],
    }
    as_json = write(tmp_path, "generated.yaml", json.dumps(document))
    as_yaml = write(tmp_path, "written.yaml", yaml.safe_dump(document))
    assert parse_job_file(as_json) == parse_job_file(as_yaml) == document
    duplicate = write(
        tmp_path, "dup.yaml", '{"jobs": [{"id": "x", "task": "t.a", "cron": "1 * * * *", "cron": "2 * * * *"}]}'
    )
    with pytest.raises(JobSpecError, match="duplicate key 'cron'"):
        parse_job_file(duplicate)
    # YAML flow style that is not JSON still parses (as YAML).
    flow = write(tmp_path, "flow.yaml", "{jobs: [{id: x, task: t.a, interval: 5}]}")
    assert parse_job_file(flow) == {"jobs": [{"id": "x", "task": "t.a", "interval": 5}]}


def test_python_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        "jobs.yaml",
        f"""\
jobs:
  - id: x
    task: t.a
    interval: 5
    args: [!!python/object/apply:os.system ["touch {marker}"]]
""",
    )
    with pytest.raises(JobSpecError, match=r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python"):
        parse_job_file(path)
    assert not marker.exists()


def test_python_object_tag_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.yaml", "jobs: !!python/object:collections.OrderedDict {}\n")
    with pytest.raises(JobSpecError, match=r"line 1: YAML error: could not determine a constructor"):
        parse_job_file(path)


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
jobs: [{id: x, task: t.a, interval: 5, args: [*i]}]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BILLION_LAUGHS, "aliases expand to more than 1000000 values"),  # 72 aliases: under the alias limit
        ("a: &a [1]\nb: [" + ",".join(["*a"] * 101) + "]\n", "more than 100 aliases"),
        ("a: &a [*a]\n", "an alias refers to the node that contains it"),
    ],
)
def test_alias_bombs_are_refused_fast(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "jobs.yaml", text)
    started = time.monotonic()
    with pytest.raises(JobSpecError, match=expected):
        parse_job_file(path)
    assert time.monotonic() - started < 0.5


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "jobs.yaml",
        """\
common: &common {task: t.a, interval: 5}
jobs: []
""",
    )
    with pytest.raises(JobSpecError, match="unknown top-level key 'common'"):
        load_job_specs([path], SETTINGS, "cron_queue")
    merged = write(
        tmp_path, "merged.yaml", "jobs:\n  - &base {id: a, task: t.a, interval: 5}\n  - {<<: *base, id: b}\n"
    )
    assert [spec.id for spec in load_job_specs([merged], SETTINGS, "cron_queue")] == ["a", "b"]


def test_oversize_file_is_refused_unparsed(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.yaml", "# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(JobSpecError, match=f"larger than {MAX_FILE_BYTES} bytes"):
        parse_job_file(path)


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 100_000 + "]" * 100_000 + "\n",  # flow style
        "".join(" " * level + "a:\n" for level in range(50_000))[: 1024 * 1024 - 1],  # block style
    ],
    ids=["flow", "block"],
)
def test_deep_nesting_is_refused_without_crashing(tmp_path: Path, text: str) -> None:
    # libyaml would crash the whole process on these; they must be refused first.
    path = write(tmp_path, "jobs.yaml", text)
    with pytest.raises(JobSpecError, match="nested too deeply"):
        parse_job_file(path)


def test_validate_documents_directly() -> None:
    docs: list[tuple[Path, dict[str, Any]]] = [
        (
            Path("configs/jobs.yaml"),
            {
                "jobs": [
                    {"id": "nightly-report", "task": "reports.build", "cron": "0 2 * * *"},
                    {"id": "x", "task": "t.a", "cron": "61 * * * *"},
                ]
            },
        )
    ]
    with pytest.raises(JobSpecError) as caught:
        validate_job_documents(docs, JobDefaults())
    assert caught.value.problems == ["configs/jobs.yaml: jobs[1] (x): cron '61 * * * *': minute must be 0-59"]


def test_spec_from_code() -> None:
    spec = JobSpec(id="x", task="demo.sleep", interval=10)
    assert (spec.kind, spec.interval_s, spec.timezone, spec.queue, spec.source) == (
        "interval",
        10.0,
        "UTC",
        "cron_queue",
        "code",
    )
    assert JobSpec(id="c", task="t", cron={"second": "*/10", "minute": "*"}).kind == "cron"
    with pytest.raises(ValidationError, match="needs exactly one of cron, interval or date, got none"):
        JobSpec(id="x", task="demo.sleep")
    with pytest.raises(ValidationError):
        JobSpec(id="x", task="demo.sleep", interval=10, unknown=1)  # type: ignore[call-arg]


def test_defaults_from_settings_and_make_spec() -> None:
    settings = SchedulerSettings(
        timezone="Europe/Berlin", jitter=2, coalesce=False, max_instances=4, misfire_grace_time=None
    )
    defaults = JobDefaults.from_settings(settings, "cq")
    assert defaults == JobDefaults(
        timezone="Europe/Berlin", queue="cq", jitter=2.0, coalesce=False, max_instances=4, misfire_grace_time=None
    )
    spec = defaults.make_spec(id="x", task="t.a", cron="0 2 * * *", jitter=0)
    assert (spec.timezone, spec.queue, spec.jitter, spec.source) == ("Europe/Berlin", "cq", 0.0, "code")
    with pytest.raises(JobSpecError) as caught:
        defaults.make_spec(id="x", task="t.a", cron="61 * * * *")
    assert caught.value.problems == ["job 'x': cron '61 * * * *': minute must be 0-59"]
    with pytest.raises(ConfigError, match="settings: queue"):
        JobDefaults.from_settings(settings, "two words")


def spec(**changes: Any) -> JobSpec:
    fields: dict[str, Any] = {"id": "x", "task": "t.a", "cron": "0 2 * * *", "args": [1], "kwargs": {"a": 1, "b": 2}}
    return JobSpec(**{**fields, **changes})


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        (spec(), spec(), True),
        (spec(), spec(source="other.yaml"), True),
        (spec(), spec(kwargs={"b": 2, "a": 1}), True),
        (spec(), spec(cron="0  2 * * *"), True),
        (spec(date=None), spec(), True),
        (spec(), spec(args=[1.0]), False),
        (spec(), spec(args=[True]), False),
        (spec(), spec(cron="0 3 * * *"), False),
        (spec(), spec(timezone="Europe/Berlin"), False),
        (spec(), spec(queue="other"), False),
        (spec(), spec(jitter=1), False),
        (spec(), spec(priority=1), False),
        (spec(), spec(enabled=False), False),
        (spec(), spec(start_date="2026-01-01T00:00:00Z"), False),
        (spec(start_date="2026-01-01T01:00:00+01:00"), spec(start_date="2026-01-01T00:00:00Z"), True),
    ],
)
def test_equality_is_what_the_reloader_needs(left: JobSpec, right: JobSpec, equal: bool) -> None:
    assert (left == right) is equal
    if equal:
        assert hash(left) == hash(right)


def test_flat_json_size_bound_is_an_upper_bound_or_none() -> None:
    """The shortcut that spares most jobs the full JSON walk and the size encoding: never
    under the real size, and None for anything it cannot vouch for."""
    import random

    rng = random.Random(7)
    scalars = [
        "",
        "x" * 50,
        'caf\u00e9 \u2603 "q" \\',
        "\n\t\x00",
        0,
        -(2**63),
        2**64 - 1,
        1e-300,
        -1.7976931348623157e308,
        0.1,
        True,
        False,
        None,
    ]
    for _ in range(2000):
        args = rng.choices(scalars, k=rng.randrange(6))
        kwargs = {
            rng.choice(["k", "caf\u00e9", '"', ""]) + str(i): rng.choice(scalars) for i in range(rng.randrange(4))
        }
        for value in (args, kwargs):
            bound = flat_json_size_bound(value)
            assert bound is not None
            assert bound >= len(json.dumps(value).encode()), value
    for bad in (
        [[1]],
        [{"a": 1}],
        {"a": [1]},
        [float("nan")],
        [float("inf")],
        {1: "x"},
        [2**64],
        [datetime.now()],
        (1,),
    ):
        assert flat_json_size_bound(bad) is None, bad  # type: ignore[arg-type]
    # What the shortcut skips still fails where it must: a nested bad value and an oversize one.
    with pytest.raises(ValidationError, match=r"\[0\]\[0\] is nan"):
        JobSpec(id="j", task="demo.sleep", interval=1, args=[[float("nan")]])
    with pytest.raises(ValidationError, match="the limit is 65536"):
        JobSpec(id="j", task="demo.sleep", interval=1, args=["\u00e9" * 11_000])
