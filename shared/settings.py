"""AppSettings: every setting of chronoq, built once at start and passed down.

Sources, highest precedence first: keyword arguments (tests), environment variables, the
dotenv file ``configs/.env.<APP_ENV>`` (``APP_ENV`` defaults to ``dev``; ``--env-file``
replaces it), then the defaults below. Environment names are the group and the field joined
by ``_``: ``redis.url`` is ``REDIS_URL``, ``scheduler.misfire_grace_time`` is
``SCHEDULER_MISFIRE_GRACE_TIME``; the top-level fields are ``APP_ENV`` and ``TASK_MODULES``.
``configs/.env.example`` documents each one.

Nothing here reads the environment at import time: call :meth:`AppSettings.load`.
"""

from __future__ import annotations

import os
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError
from shared.names import DEFAULT_ADHOC_QUEUE, DEFAULT_CRON_QUEUE
from shared.redis_settings import (
    Group,
    RedisSettings,
    SecretUrl,
    check_query,
    none_if_null,
    split_csv,
)

__all__ = [
    "AppSettings",
    "CelerySettings",
    "LogSettings",
    "RedisSettings",
    "SchedulerSettings",
    "SecretUrl",
    "WorkerSettings",
    "describe_errors",
]

CONFIG_DIR = Path("configs")


class CelerySettings(Group):
    """The broker, the result backend, queue names and task limits."""

    broker_url: SecretUrl | None = None
    """Defaults to ``REDIS_URL``."""
    result_backend: SecretUrl | None = None
    """Defaults to ``REDIS_URL``."""
    cron_queue: str = DEFAULT_CRON_QUEUE
    default_queue: str = DEFAULT_ADHOC_QUEUE
    task_time_limit_s: int | None = Field(1800, gt=0)
    """Hard limit: the pool process running a task longer than this is killed."""
    task_soft_time_limit_s: int | None = Field(None, gt=0)
    visibility_timeout_s: int = Field(3600, gt=0)
    """An unacknowledged message is redelivered after this; must exceed the hard time limit."""
    result_expires_s: int = Field(86400, gt=0)
    task_send_sent_event: bool = True
    """Emit Celery's ``task-sent`` event for every message published (scheduled fires included),
    so Flower and ``celery events`` see tasks from the moment they are queued."""

    @field_validator("broker_url", "result_backend", "task_time_limit_s", "task_soft_time_limit_s", mode="before")
    @classmethod
    def _nullable(cls, value: Any) -> Any:
        return none_if_null(value)

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _check_urls(cls, value: SecretUrl | None) -> SecretUrl | None:
        return check_query(value)

    @model_validator(mode="after")
    def _check_limits(self) -> CelerySettings:
        # With acks_late a message is only acknowledged when its task ends; a task still
        # running when the visibility timeout passes is delivered a second time and runs twice.
        hard = self.task_time_limit_s
        if hard is None:
            raise ValueError(
                "CELERY_TASK_TIME_LIMIT_S must be set: without a hard limit a task can outlive "
                "CELERY_VISIBILITY_TIMEOUT_S and be delivered twice"
            )
        if self.visibility_timeout_s <= hard:
            raise ValueError(
                f"CELERY_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be greater than "
                f"CELERY_TASK_TIME_LIMIT_S ({hard}), or long tasks are delivered twice"
            )
        soft = self.task_soft_time_limit_s
        if soft is not None and soft >= hard:
            raise ValueError(f"CELERY_TASK_SOFT_TIME_LIMIT_S ({soft}) must be below CELERY_TASK_TIME_LIMIT_S ({hard})")
        if self.cron_queue == self.default_queue:
            raise ValueError(
                "CELERY_CRON_QUEUE and CELERY_DEFAULT_QUEUE must differ, or scheduled and ad-hoc work share one queue"
            )
        return self


class SchedulerSettings(Group):
    """Job defaults; each job in a file or in code may override them."""

    timezone: str = "UTC"
    jitter: float = Field(0, ge=0)
    """Seconds: each fire is dispatched 0..jitter s late; the schedule itself never moves."""
    coalesce: bool = True
    max_instances: int = Field(1, ge=1)
    misfire_grace_time: int | None = Field(60, gt=0)
    """Seconds a fire may be late and still run; None: no limit."""
    overlap: Literal["skip", "buffer_one", "allow"] = "skip"
    """What a fire does while max_instances of its job are queued or running fleet-wide."""
    takeover_s: float = Field(2.0, gt=0)
    """A replica that is not the leader dispatches a fire this long after it is due, if no
    replica has yet: the fail-over time when a replica dies. The leader lease lasts 90% of it
    (renewed every third of that) and a follower tries the lease the instant it lapses, so a
    survivor leads, and decides the dead leader's fires, within this of the death."""
    slot_margin_s: int = Field(30, ge=0)
    """A slot of a task whose worker died lapses this long after the task's time limit."""
    history_limit: int = Field(100, ge=1)
    """Fires kept per job in the run history."""
    fence_window_s: int = Field(300, ge=0)
    """Seconds a fire's record is kept past the history limit, to fence duplicates: after that
    (and once no slot or buffer needs it) it is deleted and every fire of the job up to it
    counts as decided for good. Keep it above the longest jitter plus ``takeover_s``: a fire
    decided later than this after its nominal time, once later fires of its job were retired,
    would count as decided and not run."""
    publish_batch_size: int = Field(500, ge=1, le=10000)
    """Fires published per Redis round trip when many are due at once."""
    lookahead_s: float = Field(5.0, ge=0, le=60)
    """Fires are handed over and encoded this long before they are due, then published at the
    due instant (never earlier). A pause, resume or removal still applies at the due instant."""
    job_file_max_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=1024**3)
    """A job file larger than this is refused unread (10,000 jobs as JSON take about 3.5 MB)."""
    backfill_max_fires: int = Field(1000, ge=1, le=1_000_000)
    """Fires one backfill request may dispatch; a larger range is refused, nothing dispatched."""
    changes_maxlen: int = Field(10_000, ge=100)
    """Entries kept in the change feed of API jobs; a replica that falls further behind resyncs."""
    audit_interval_s: float = Field(10.0, gt=0, le=3600)
    """How often the leader's dispatch audit looks for dispatched fires whose run has not
    started (scheduler.audit); a full batch is followed by the next at once."""
    audit_margin_s: float = Field(60.0, ge=0)
    """A dispatched fire is looked up once its run has not started this long past the
    visibility timeout (and again as long after each look)."""
    audit_batch_size: int = Field(500, ge=1, le=100_000)
    """Fires the audit looks up per Redis call (one Lua script: about 10 ms of Redis for 500)."""
    audit_scan_max: int = Field(1000, ge=1, le=1_000_000)
    """Queue entries the audit reads per queue list and call, from the oldest, to find an
    overdue fire's message; a fire not found in a longer list is taken as still queued."""

    @field_validator("misfire_grace_time", mode="before")
    @classmethod
    def _nullable(cls, value: Any) -> Any:
        return none_if_null(value)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)") from None
        return value


class WorkerSettings(Group):
    """How ``chronoq worker`` runs its Celery worker; its command-line flags override these."""

    queues: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated; empty: both the cron and the default queue."""
    concurrency: int | None = Field(None, ge=1)
    """None: the number of CPUs."""
    pool: Literal["prefork", "threads", "solo"] = "prefork"
    prefetch_multiplier: int = Field(1, ge=1)
    max_tasks_per_child: int | None = Field(None, ge=1)
    max_memory_per_child_kb: int | None = Field(None, ge=1)
    hostname: str | None = None

    @field_validator("concurrency", "max_tasks_per_child", "max_memory_per_child_kb", "hostname", mode="before")
    @classmethod
    def _nullable(cls, value: Any) -> Any:
        return none_if_null(value)

    @field_validator("queues", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_csv(value)


class HttpSettings(Group):
    """The scheduler's probe and metrics server (``/metrics``, ``/healthz``, ``/readyz``)."""

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback is allowed and logged (the endpoints have no
    authentication: keep them on a private network)."""
    port: int = Field(9808, ge=0, le=65535)
    """0 turns the server off."""
    liveness_timeout_s: float = Field(10.0, gt=0)
    """``/healthz`` fails once the event loop has not ticked for this long."""
    job_label_limit: int = Field(1000, ge=0)
    """Per-job series for the first this many jobs by id; the rest are summed up as ``job="_other"``."""
    queue_label_limit: int = Field(100, ge=1)
    """``chronoq_queue_length`` for this many queues (the configured ones first, then the jobs'
    by name); the rest are summed up as ``queue="_other"``."""
    fleet_cache_s: float = Field(2.0, ge=0)
    """Fleet data read from Redis is reused for this long, whatever the scrape rate."""
    test_block_loop_s: float = Field(0, ge=0)
    """Test hook, off (0) by default: when set, SIGUSR2 blocks the event loop for this long, so a
    test can watch ``/healthz`` fail and recover. Never set it in production."""


class LogSettings(Group):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("file", mode="before")
    @classmethod
    def _nullable(cls, value: Any) -> Any:
        return none_if_null(value)


class WebSettings(Group):
    """``chronoq web``: where the console listens and who may use it (docs/console.md)."""

    host: str = "127.0.0.1"
    """Any address but loopback is refused unless ``token`` or ``username``+``password`` is set."""
    port: int = Field(8765, ge=0, le=65535)
    token: SecretStr | None = None
    """Bearer token for ``/api/v1`` (pages accept it as the basic-auth password too)."""
    username: str | None = None
    password: SecretStr | None = None
    """Basic auth for pages and the API, with ``username``."""
    read_only: bool = False
    """Refuse every change (403); pages hide the actions."""
    poll_s: int = Field(5, ge=1, le=3600)
    """How often a page's live regions refresh while its tab is visible (the jobs list every
    2x, the timeline every 3x)."""


class AppSettings(BaseSettings):
    """All of chronoq's settings. Build with :meth:`load` (or directly in tests, with
    ``_env_file=None``)."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="_",
        env_nested_max_split=1,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    app_env: str = "dev"
    task_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated dotted module names of users' own tasks, imported by workers."""
    redis: RedisSettings = RedisSettings()
    celery: CelerySettings = CelerySettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    worker: WorkerSettings = WorkerSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    web: WebSettings = WebSettings()

    @field_validator("task_modules", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_csv(value)

    @model_validator(mode="after")
    def _check_sentinel(self) -> AppSettings:
        # Checked here, not in RedisSettings, so that the line names the variables alone.
        redis = self.redis
        if redis.wait_replicas and redis.wait_timeout_ms >= redis.socket_timeout_s * 1000:
            raise ValueError(
                f"REDIS_WAIT_TIMEOUT_MS ({redis.wait_timeout_ms}) must be below REDIS_SOCKET_TIMEOUT_S "
                f"({redis.socket_timeout_s:g} s), or a write waiting for its replicas times out the connection"
            )
        if redis.sentinel_master is not None and not redis.sentinels:
            raise ValueError(
                "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not: list the Sentinels (host:port,...)"
            )
        if not redis.sentinels:
            extra = [
                name
                for name, value in (
                    ("REDIS_SENTINEL_PASSWORD", redis.sentinel_password),
                    ("REDIS_SENTINEL_DB", redis.sentinel_db or None),
                    ("REDIS_SENTINEL_TLS", redis.sentinel_tls or None),
                )
                if value is not None
            ]
            if extra:
                raise ValueError(f"{', '.join(extra)} set but REDIS_SENTINELS is not: they only apply with Sentinel")
            return self
        if redis.sentinel_master is None:
            raise ValueError("REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not: name the master they monitor")
        if redis.url is not None:
            raise ValueError(
                "REDIS_URL and REDIS_SENTINELS are both set: with Sentinel the master's address comes from the "
                "Sentinels; unset REDIS_URL (the password is REDIS_PASSWORD, the database REDIS_SENTINEL_DB)"
            )
        if self.celery.broker_url is not None:
            raise ValueError(
                "CELERY_BROKER_URL is set with REDIS_SENTINELS: the broker is the master the Sentinels name; unset it"
            )
        return self

    @model_validator(mode="after")
    def _check_visibility(self) -> AppSettings:
        # A fire's run lease and slot last the time limit plus the slot margin. A message still
        # unacknowledged when the visibility timeout passes is delivered again; before the
        # lease lapses that copy is deferred, and it must be able to run (time limit) before
        # the visibility timeout hands it out once more.
        hard, margin = self.celery.task_time_limit_s or 0, self.scheduler.slot_margin_s
        visibility = self.celery.visibility_timeout_s
        if visibility <= hard + margin:
            raise ValueError(
                f"CELERY_VISIBILITY_TIMEOUT_S ({visibility}) must be greater than CELERY_TASK_TIME_LIMIT_S "
                f"({hard}) + SCHEDULER_SLOT_MARGIN_S ({margin}), or a task that outlives its run lease is "
                "delivered twice"
            )
        return self

    @classmethod
    def load(cls, env_file: Path | None = None, **overrides: Any) -> AppSettings:
        """Build the settings from the environment and the dotenv file.

        ``env_file`` defaults to ``configs/.env.<APP_ENV>`` when that file exists. Raises
        :class:`ConfigError` with one line per problem, naming the variable.
        """
        if env_file is None:
            candidate = CONFIG_DIR / f".env.{os.environ.get('APP_ENV', 'dev')}"
            env_file = candidate if candidate.is_file() else None
        elif not env_file.is_file():
            raise ConfigError(f"{env_file}: no such env file")
        try:
            return cls(_env_file=env_file, **overrides)
        except ValidationError as exc:
            source = f" (environment or {env_file})" if env_file else " (environment)"
            raise ConfigError([f"settings{source}: {line}" for line in describe_errors(exc)]) from None

    def with_redis_url(self, url: str) -> AppSettings:
        """A copy pointing at ``url`` (used once the embedded server is up)."""
        return self.model_copy(update={"redis": self.redis.model_copy(update={"url": SecretUrl(url)})})

    def broker_url(self) -> str:
        """Secret: never log it."""
        return self.celery.broker_url.get_secret_value() if self.celery.broker_url else self.redis.connection_url()

    def result_backend_url(self) -> str:
        """Secret: never log it."""
        return (
            self.celery.result_backend.get_secret_value() if self.celery.result_backend else self.redis.connection_url()
        )


_SECRET_FIELDS = {"url", "password", "sentinel_password", "broker_url", "result_backend", "token"}


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per validation problem, naming the environment variable, never a secret."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
        var = "_".join(loc).upper() or "settings"
        if error["type"] == "extra_forbidden":
            lines.append(f"{var}: unknown setting (misspelt? see configs/.env.example)")
            continue
        message = error["msg"].removeprefix("Value error, ")
        shown = "" if (loc and loc[-1] in _SECRET_FIELDS) else f" (got {str(error.get('input'))[:80]!r})"
        if error["type"] == "value_error" and len(loc) <= 1:
            shown = ""
        # A check across groups (AppSettings itself) names its variables in the message.
        lines.append(f"{var}: {message}{shown}" if loc else message)
    return lines
