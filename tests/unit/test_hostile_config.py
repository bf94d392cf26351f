"""Hostile numbers in job files and hostile settings: every one is a validation problem naming
the place (file, job, field or variable), never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scheduler.bounds import MAX_DURATION_S, safe_repr
from scheduler.specs import load_job_specs
from shared.errors import ConfigError, JobSpecError
from shared.redis_checks import eviction_policy, eviction_problem, tls_warnings
from shared.settings import AppSettings, RedisSettings, SchedulerSettings
from shared.urls import ALLOWED_QUERY_PARAMETERS, url_query_problem

SETTINGS = SchedulerSettings()
HUGE = "1" + "0" * 5000  # Python 3.11 refuses int <-> str beyond 4,300 digits

# (the job's lines after id/task, the field the one problem must name)
HOSTILE_JOBS = [
    ("interval: 99999999999999", "interval"),
    ("interval: 1.0e308", "interval"),
    ("interval: .inf", "interval"),
    ("interval: {days: 99999999999}", "interval"),
    ("interval: {weeks: 1.0e308}", "interval"),
    (f"interval: {HUGE}", "interval"),
    (f"interval: -{HUGE}", "interval"),
    (f"interval: {{days: {HUGE}}}", "interval"),
    (f"interval: 5\n    args: [{HUGE}]", "args"),
    (f"interval: 5\n    args: [[{HUGE}]]", "args"),
    ("interval: 5\n    args: [99999999999999999999999]", "args"),
    (f"interval: 5\n    kwargs: {{n: {HUGE}}}", "kwargs"),
    ("interval: 5\n    jitter: 1.0e308", "jitter"),
    (f"interval: 5\n    jitter: {HUGE}", "jitter"),
    ("interval: 5\n    misfire_grace_time: 99999999999999999999", "misfire_grace_time"),
    ("interval: 5\n    expires: 1.0e308", "expires"),
    (f"interval: 5\n    expires: {HUGE}", "expires"),
    ("interval: 5\n    time_limit: 99999999999999999999999", "time_limit"),
    (f"interval: 5\n    soft_time_limit: {HUGE}", "soft_time_limit"),
    (f"interval: 5\n    max_instances: {HUGE}", "max_instances"),
    ("interval: 5\n    max_instances: 99999999999", "max_instances"),
    (f"interval: 5\n    priority: {HUGE}", "priority"),
    (f"cron: {{second: {HUGE}}}", "cron"),
    ("cron: {second: 99999999999999999999}", "cron"),
    (f"date: {HUGE}", "date"),
    ('interval: 5\n    start_date: "9999-12-31T23:59:59"', "start_date"),
    ('interval: 5\n    end_date: "9999-12-31T23:59:59"', "end_date"),
]


@pytest.mark.parametrize(("body", "field"), HOSTILE_JOBS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(HOSTILE_JOBS)])
def test_hostile_numbers_are_one_problem_naming_file_job_and_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(f"jobs:\n  - id: hostile\n    task: demo.sleep\n    {body}\n")
    with pytest.raises(JobSpecError) as caught:
        load_job_specs([path], SETTINGS, "cron_queue")
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: jobs[0] (hostile): {field}"), problem
    assert len(problem) < 400


def test_hostile_numbers_in_json_job_files(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    job = {"id": "hostile", "task": "demo.sleep", "interval": 5, "kwargs": {"n": 0}}
    path.write_text(json.dumps({"jobs": [job]}).replace('"n": 0', f'"n": {HUGE}'))
    with pytest.raises(JobSpecError) as caught:
        load_job_specs([path], SETTINGS, "cron_queue")
    assert caught.value.problems == [
        f"{path}: jobs[0] (hostile): kwargs: ['n'] is <a number of 5001 digits>: integers must fit in 64 bits "
        "(pass a huge number as a string)"
    ]


def test_a_huge_integer_in_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(f'[[jobs]]\nid = "hostile"\ntask = "demo.sleep"\ninterval = {HUGE}\n')
    with pytest.raises(JobSpecError) as caught:
        load_job_specs([path], SETTINGS, "cron_queue")
    assert caught.value.problems[0].startswith(f"{path}: ")


@pytest.mark.parametrize(
    "body",
    [
        f"interval: {MAX_DURATION_S}",
        f"interval: 5\n    misfire_grace_time: {MAX_DURATION_S}\n    time_limit: 3000",
        "interval: 5\n    args: [18446744073709551615, -9223372036854775808, 1.0e308]",
        'interval: 5\n    start_date: "8999-01-01T00:00:00"',
    ],
)
def test_large_but_sane_numbers_still_load(tmp_path: Path, body: str) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(f"jobs:\n  - id: big\n    task: demo.sleep\n    {body}\n")
    assert [spec.id for spec in load_job_specs([path], SETTINGS, "cron_queue")] == ["big"]


def test_safe_repr_never_raises() -> None:
    huge = 10**5000
    assert safe_repr(huge) == "<an integer of about 5001 digits>"
    assert safe_repr([huge]) == "<a list holding a huge integer>"
    assert safe_repr("x" * 500).endswith("...")


@pytest.mark.parametrize(
    "parameter",
    ["credential_provider=evilmod.Evil", "connection_class=evilmod.Evil", "parser_class=x.Y", "retry_on_error=x"],
)
@pytest.mark.parametrize("variable", ["redis_url", "celery_broker_url", "celery_result_backend"])
def test_url_parameters_that_name_code_are_refused(variable: str, parameter: str) -> None:
    group, field = variable.split("_", 1)
    url = f"redis://:pw@127.0.0.1:6379/0?db=0&{parameter}"
    overrides: dict[str, Any] = {group: {"url" if field == "url" else field: url}}
    with pytest.raises(ConfigError) as caught:
        AppSettings.load(None, **overrides)
    (problem,) = caught.value.problems
    assert variable.upper() in problem and parameter.split("=")[0] in problem
    assert "names Python code" in problem and "pw" not in problem


def test_url_allow_list() -> None:
    assert url_query_problem("rediss://h:6380/1?" + "&".join(f"{p}=1" for p in ALLOWED_QUERY_PARAMETERS)) is None
    assert "is not passed on" in str(url_query_problem("redis://h/0?foo=1"))


@pytest.mark.parametrize(
    ("policy", "refused"),
    [
        ("noeviction", False),
        (None, False),
        ("allkeys-lru", True),
        ("allkeys-lfu", True),
        ("allkeys-random", True),
        ("volatile-lru", True),
        ("volatile-ttl", True),
    ],
)
def test_eviction_policies(policy: str | None, refused: bool) -> None:
    assert (eviction_problem(policy) is not None) is refused


def test_eviction_policy_from_either_reply_shape() -> None:
    assert eviction_policy({"maxmemory-policy": "noeviction"}) == "noeviction"
    assert eviction_policy([b"maxmemory-policy", b"allkeys-lru"]) == "allkeys-lru"
    assert eviction_policy({}) is None


def test_unverified_tls_is_warned() -> None:
    assert tls_warnings(RedisSettings(url="rediss://h/0", ssl_cert_reqs="none"))
    assert not tls_warnings(RedisSettings(url="rediss://h/0"))
    assert not tls_warnings(RedisSettings(url="redis://h/0", ssl_cert_reqs="none"))
