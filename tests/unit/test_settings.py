"""AppSettings: sources, names, validation messages and secrecy."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import AppSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("REDIS_", "CELERY_", "WORKER_", "LOG_", "SCHEDULER_", "APP_ENV", "TASK_MODULES")):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    settings = AppSettings.load()
    assert settings.redis.url is None
    assert settings.celery.cron_queue == "cron_queue"
    assert settings.celery.default_queue == "celery_queue"
    assert settings.redis.key_prefix == "chronoq:"
    assert settings.scheduler.misfire_grace_time == 60
    assert settings.worker.pool == "prefork"


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://localhost:6379/2")
    monkeypatch.setenv("SCHEDULER_MISFIRE_GRACE_TIME", "null")
    monkeypatch.setenv("SCHEDULER_MAX_INSTANCES", "3")
    monkeypatch.setenv("TASK_MODULES", "myapp.tasks, other.tasks")
    monkeypatch.setenv("WORKER_QUEUES", "cron_queue")
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = AppSettings.load()
    assert settings.redis.connection_url() == "redis://localhost:6379/2"
    assert settings.scheduler.misfire_grace_time is None
    assert settings.scheduler.max_instances == 3
    assert settings.task_modules == ["myapp.tasks", "other.tasks"]
    assert settings.worker.queues == ["cron_queue"]
    assert (settings.log.format, settings.log.level) == ("json", "DEBUG")
    # Broker and backend default to REDIS_URL.
    assert settings.broker_url() == settings.result_backend_url() == "redis://localhost:6379/2"


def test_env_file_by_app_env_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / ".env.staging").write_text("REDIS_KEY_PREFIX=staging:\nSCHEDULER_JITTER=5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APP_ENV", "staging")
    monkeypatch.setenv("SCHEDULER_JITTER", "2")  # the environment beats the file
    settings = AppSettings.load()
    assert settings.redis.key_prefix == "staging:"
    assert settings.scheduler.jitter == 2


def test_every_problem_reported_naming_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "x.env"
    env_file.write_text("WORKER_POOLS=threads\nSCHEDULER_TIMEZONE=Mars/Olympus\n")
    monkeypatch.setenv("WORKER_CONCURRENCY", "-1")
    monkeypatch.setenv("REDIS_URL", "http://user:hunter22@host/0")
    with pytest.raises(ConfigError) as caught:
        AppSettings.load(env_file)
    problems = caught.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "WORKER_POOLS: unknown setting" in text
    assert "SCHEDULER_TIMEZONE: unknown time zone 'Mars/Olympus'" in text
    assert "WORKER_CONCURRENCY: Input should be greater than or equal to 1" in text
    assert "REDIS_URL: must start with redis://" in text
    assert "hunter22" not in text


def test_visibility_timeout_must_exceed_time_limit() -> None:
    with pytest.raises(ConfigError, match=r"CELERY_VISIBILITY_TIMEOUT_S \(100\) must be greater"):
        AppSettings.load(celery={"visibility_timeout_s": 100, "task_time_limit_s": 300})
    with pytest.raises(ConfigError, match="CELERY_TASK_TIME_LIMIT_S must be set"):
        AppSettings.load(celery={"task_time_limit_s": None})


def test_queues_must_differ() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        AppSettings.load(celery={"cron_queue": "q", "default_queue": "q"})


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such env file"):
        AppSettings.load(tmp_path / "nope.env")


def test_secrets_are_redacted_in_repr_and_str() -> None:
    settings = AppSettings(_env_file=None, redis={"url": "redis://app:hunter22@db:6379/0", "password": "pw-override"})
    shown = repr(settings) + str(settings) + str(settings.redis.url)
    assert "hunter22" not in shown
    assert "pw-override" not in shown
    assert "redis://app:***@db:6379/0" in shown
    # REDIS_PASSWORD replaces the URL's password.
    assert settings.redis.connection_url() == "redis://app:pw-override@db:6379/0"


def test_tls_verifies_certificates_by_default() -> None:
    settings = AppSettings(_env_file=None, redis={"url": "rediss://:pw@db:6380/0"})
    assert settings.redis.uses_tls
    assert settings.redis.ssl_options()["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_env_example_documents_every_setting() -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "configs" / ".env.example").read_text()
    documented = set(re.findall(r"#\s*([A-Z_]+)=", text))
    fields = set()
    for name, info in AppSettings.model_fields.items():
        group = info.annotation
        if isinstance(group, type) and hasattr(group, "model_fields"):
            fields |= {f"{name}_{sub}".upper() for sub in group.model_fields}
        else:
            fields.add(name.upper())
    assert documented == fields


def setting_names() -> set[str]:
    names = set()
    for name, info in AppSettings.model_fields.items():
        group = info.annotation
        if isinstance(group, type) and hasattr(group, "model_fields"):
            names |= {f"{name}_{sub}".upper() for sub in group.model_fields}
        else:
            names.add(name.upper())
    return names


def test_the_settings_table_in_the_docs_documents_every_setting() -> None:
    """docs/configuration.md's table names every setting and nothing else. A cell may shorten a
    row of names (`SCHEDULER_TIMEZONE`, `_JITTER`: a prefix of the previous name, then the rest)
    or name a group (`WORKER_*`)."""
    import re

    fields = setting_names()
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    documented: set[str] = set()
    groups: set[str] = set()
    wrong: list[str] = []
    for row in (line for line in text.splitlines() if line.startswith("| `")):
        previous = ""
        for name in re.findall(r"`([A-Z_*]+)`", row.split("|")[1]):
            if name.endswith("*"):
                groups.add(name[:-1])
                continue
            if name.startswith("_"):
                parts = previous.split("_")
                found = [p for k in range(1, len(parts)) if (p := "_".join(parts[:k]) + name) in fields]
                if not found:
                    wrong.append(f"{previous} / {name}")
                    continue
                name = found[-1]
            previous = name
            documented.add(name)
    assert wrong == [], "shortened names in docs/configuration.md that are no setting"
    assert documented - fields == set(), "docs/configuration.md names settings that do not exist"
    undocumented = {name for name in fields - documented if not name.startswith(tuple(groups))}
    assert undocumented == set(), "settings missing from docs/configuration.md's table"
