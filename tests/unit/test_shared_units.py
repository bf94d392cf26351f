"""Pure units of shared/: names, redaction, the Celery configuration, worker arguments, logging."""

from __future__ import annotations

import io
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from loguru import logger

from shared.celery_app import celery_config, create_celery_app
from shared.logging import configure_logging, log_context
from shared.names import RedisKeys, fire_task_id, format_scheduled_at
from shared.redaction import redact_text, redact_url
from shared.settings import AppSettings
from workers.main import worker_argv


def make(**overrides: object) -> AppSettings:
    return AppSettings(_env_file=None, redis={"url": "redis://:topsecret@localhost:6379/0"}, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:pw@h:1/0", "rediss://user:***@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_urls_and_known_secrets() -> None:
    text = "connect redis://:abc@x:1/0 failed; password was longsecret"
    assert redact_text(text, ("longsecret",)) == "connect redis://:***@x:1/0 failed; password was ***"


def test_fire_task_id_is_deterministic_per_job_and_instant() -> None:
    at = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    same_instant = at.astimezone(timezone(timedelta(hours=2)))
    assert fire_task_id("a", at) == fire_task_id("a", same_instant)
    assert fire_task_id("a", at) != fire_task_id("b", at)
    assert fire_task_id("a", at) != fire_task_id("a", at + timedelta(seconds=1))
    assert format_scheduled_at(same_instant) == "2026-03-29T01:00:00+00:00"
    assert format_scheduled_at(at + timedelta(milliseconds=200)) == "2026-03-29T01:00:00.200000+00:00"
    assert fire_task_id("a", at) != fire_task_id("a", at + timedelta(milliseconds=200))
    with pytest.raises(ValueError, match="timezone-aware"):
        format_scheduled_at(datetime(2026, 1, 1))
    # The id is a standard uuid5 (ids of fires published before the faster spelling still match).
    namespace = uuid.UUID("6f1d4d0e-3f7a-5d7b-9a55-0c6e2f1b7c11")
    for job_id, when in (("a", at), ("nightly-report", at + timedelta(microseconds=7)), ("ü/x", same_instant)):
        expected = str(uuid.uuid5(namespace, f"{job_id}|{format_scheduled_at(when)}"))
        assert fire_task_id(job_id, when) == expected


def test_keys_start_with_prefix() -> None:
    keys = RedisKeys("acme:")
    assert keys.key("job", "x") == "acme:job:x"
    assert keys.pattern == "acme:*"


def test_celery_config_is_json_only_with_safe_delivery() -> None:
    config = celery_config(make())
    assert config["accept_content"] == ["json"]
    assert config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == config["event_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    assert config["broker_transport_options"]["socket_timeout"] == 5.0
    assert {q.name for q in config["task_queues"]} == {"cron_queue", "celery_queue"}
    assert config["task_default_queue"] == "celery_queue"
    assert config["worker_send_task_events"] and config["task_send_sent_event"]


def test_pickle_is_refused_by_the_app() -> None:
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads

    app = create_celery_app(make())
    with pytest.raises(ContentDisallowed):
        loads(b"\x80\x04K\x01.", "application/x-python-serialize", "binary", accept=app.conf.accept_content)  # type: ignore[no-untyped-call]


def test_scheduled_messages_route_to_cron_queue() -> None:
    app = create_celery_app(make())
    router = app.amqp.router
    scheduled = router.route({"headers": {"job_id": "x"}}, "any.task")
    adhoc = router.route({}, "any.task")
    explicit = router.route({"headers": {"job_id": "x"}, "queue": "special"}, "any.task")
    assert scheduled["queue"].name == "cron_queue"
    assert adhoc["queue"].name == "celery_queue"
    assert explicit["queue"].name == "special"


def test_tls_options_reach_broker_and_backend() -> None:
    import ssl

    config = celery_config(AppSettings(_env_file=None, redis={"url": "rediss://:pw@db:6380/0"}))
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert config["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_worker_argv_from_settings() -> None:
    settings = make(
        worker={
            "queues": "cron_queue",
            "concurrency": 3,
            "pool": "threads",
            "max_tasks_per_child": 50,
            "max_memory_per_child_kb": 200000,
            "hostname": "w1@h",
        }
    )
    argv = worker_argv(settings)
    assert argv[:3] == ["worker", "--queues", "cron_queue"]
    for flag, value in [
        ("--pool", "threads"),
        ("--concurrency", "3"),
        ("--max-tasks-per-child", "50"),
        ("--max-memory-per-child", "200000"),
        ("--hostname", "w1@h"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    assert worker_argv(make())[2] == "cron_queue,celery_queue"


def test_json_logging_with_context_and_redaction() -> None:
    stream = io.StringIO()
    settings = make(log={"format": "json", "level": "DEBUG"})
    configure_logging(settings, process="test", stream=stream)
    try:
        with log_context(job_id="nightly", scheduled_at="2026-01-01T02:00:00+00:00", task_id="t-1", trace_id="tr-9"):
            logger.info("dispatched via redis://:topsecret@localhost:6379/0")
        logging.getLogger("celery.worker").warning("stdlib says topsecret")
    finally:
        logger.remove()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["job_id"] == "nightly" and first["task_id"] == "t-1" and first["trace_id"] == "tr-9"
    assert first["scheduled_at"] == "2026-01-01T02:00:00+00:00"
    assert first["process"] == "test" and first["level"] == "INFO"
    assert "topsecret" not in stream.getvalue()
    assert second["logger"] == "celery.worker" and second["message"] == "stdlib says ***"
    assert "job_id" not in second


def test_text_logging_shows_context() -> None:
    stream = io.StringIO()
    configure_logging(make(), process="scheduler", stream=stream)
    try:
        with log_context(job_id="hb"):
            logger.info("fired")
    finally:
        logger.remove()
    line = stream.getvalue().strip()
    assert "| scheduler |" in line and line.endswith("fired [job_id=hb]")


def test_an_outcome_is_retried_through_a_failover_and_never_past_the_message_coming_back() -> None:
    from workers.lease import finish_retry_s

    assert finish_retry_s(10) == 5.0  # the fault suite's visibility timeout: past a 3.3 s failover
    assert finish_retry_s(4) == 3.0  # never under 3 s
    assert finish_retry_s(3600) == 60.0  # the default: a minute at most, a slot blocked meanwhile
