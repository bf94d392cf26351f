"""configure_logging(): one place that sets up loguru for every chronoq process.

- Human-readable lines by default; one JSON object per line with ``LOG_FORMAT=json``.
- The stdlib loggers (Celery, kombu, APScheduler, redis-py) are routed into loguru.
- Context bound with :func:`log_context` (``job_id``, ``task_id``, ``scheduled_at``,
  ``trace_id``) is attached to every line logged inside it, across threads that copy the
  context and asyncio tasks.
- URL credentials and the configured secrets are masked in every message, whoever logs it.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import FrameType, MappingProxyType
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from shared.redaction import redact_text

if TYPE_CHECKING:
    from loguru import Message, Record

    from shared.settings import AppSettings

CONTEXT_KEYS = ("job_id", "task_id", "scheduled_at", "trace_id")
_context: ContextVar[Mapping[str, str]] = ContextVar("chronoq_log_context", default=MappingProxyType({}))

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | "
    "<cyan>{extra[proc]}</cyan> | {message}<dim>{extra[ctx]}</dim>"
)


def bind_context(**values: str | None) -> Token[Mapping[str, str]]:
    """Add ``values`` to the log context; undo with :func:`reset_context`."""
    merged = {**_context.get(), **{k: str(v) for k, v in values.items() if v is not None}}
    return _context.set(merged)


def reset_context(token: Token[Mapping[str, str]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Attach ``values`` (job_id, task_id, scheduled_at, trace_id, ...) to every line inside."""
    token = bind_context(**values)
    try:
        yield
    finally:
        reset_context(token)


def current_context() -> dict[str, str]:
    return dict(_context.get())


class _InterceptHandler(logging.Handler):
    """Send a stdlib record to loguru at the same level, attributed to its original caller."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame: FrameType | None = logging.currentframe()
        depth = 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).bind(logger_name=record.name).log(level, record.getMessage())


def _json_sink(stream: TextIO) -> Any:
    def write(message: Message) -> None:
        record = message.record
        payload: dict[str, Any] = {
            "time": record["time"].isoformat(),
            "level": record["level"].name,
            "message": record["message"],
            "logger": record["extra"].get("logger_name", record["name"]),
            "process": record["extra"]["proc"],
        }
        for key, value in record["extra"].items():
            if key not in ("proc", "ctx", "logger_name", "_secrets"):
                payload[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
        if record["exception"] is not None:
            exc = record["exception"]
            text = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
            payload["exception"] = redact_text(text, record["extra"].get("_secrets", ()))
        stream.write(json.dumps(payload, default=str) + "\n")
        stream.flush()

    return write


_debug_enabled = True


def debug_enabled() -> bool:
    """Whether DEBUG lines are written (True until :func:`configure_logging` says otherwise):
    for loops that would otherwise build 100,000 lines to throw away."""
    return _debug_enabled


def configure_logging(settings: AppSettings, *, process: str = "chronoq", stream: TextIO | None = None) -> None:
    """(Re)configure loguru for this process; safe to call again after a fork.

    ``process`` names the process kind in each line (``scheduler``, ``worker``...). Secrets from
    ``settings`` are masked wherever they appear.
    """
    log = settings.log
    secrets = tuple(
        s.get_secret_value()
        for s in (
            settings.redis.password,
            settings.redis.sentinel_password,
            settings.redis.url,
            settings.celery.broker_url,
            settings.celery.result_backend,
        )
        if s is not None
    )
    # Whole URLs are secrets too: their passwords are masked by the URL rule, and the bare
    # password is masked as a secret string when it is long enough to be unambiguous.
    passwords = tuple(p for p in (_password_of(s) for s in secrets) if p)

    def patch(record: Record) -> None:
        record["message"] = redact_text(record["message"], passwords)
        extra = record["extra"]
        extra.update(_context.get())
        extra.setdefault("proc", process)
        extra["_secrets"] = passwords
        ctx = " ".join(f"{k}={extra[k]}" for k in CONTEXT_KEYS if k in extra)
        extra["ctx"] = f" [{ctx}]" if ctx else ""

    global _debug_enabled
    _debug_enabled = _stdlib_level(log.level) <= logging.DEBUG
    logger.remove()
    logger.configure(patcher=patch, extra={"proc": process, "ctx": ""})
    out = stream or sys.stderr
    if log.format == "json":
        logger.add(_json_sink(out), level=log.level, format="{message}", backtrace=False, diagnose=False)
    else:
        logger.add(out, level=log.level, format=_TEXT_FORMAT, colorize=None, backtrace=False, diagnose=False)
    if log.file is not None:
        log.file.parent.mkdir(parents=True, exist_ok=True)
        if log.format == "json":
            handle = log.file.open("a", encoding="utf-8")
            logger.add(_json_sink(handle), level=log.level, format="{message}", backtrace=False, diagnose=False)
        else:
            logger.add(log.file, level=log.level, format=_TEXT_FORMAT, colorize=False, backtrace=False, diagnose=False)

    logging.basicConfig(
        handlers=[_InterceptHandler()], level=logging.getLevelName(_stdlib_level(log.level)), force=True
    )
    for name in ("celery", "kombu", "apscheduler", "redis", "amqp"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    # kombu and APScheduler are chatty at INFO about things operators do not act on.
    logging.getLogger("apscheduler.executors").setLevel(max(logging.WARNING, _stdlib_level(log.level)))
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.WARNING, _stdlib_level(log.level)))


def _stdlib_level(level: str) -> int:
    mapping = {"TRACE": logging.DEBUG, "SUCCESS": logging.INFO}
    return mapping.get(level) or int(logging.getLevelName(level))


def _password_of(url_or_secret: str) -> str:
    if "://" not in url_or_secret:
        return url_or_secret
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url_or_secret).password
    except ValueError:
        return ""
    return unquote(password) if password else ""
