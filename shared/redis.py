"""Redis clients built from settings, a reachability check, and resolving where Redis is.

Every client has socket timeouts so a stalled Redis never hangs a caller, and ``rediss://``
verifies the server certificate unless ``REDIS_SSL_CERT_REQS`` says otherwise.

With Sentinel (``REDIS_SENTINELS``) the address is a ``sentinel://...;sentinel://...`` URL
(:meth:`RedisSettings.connection_url`) and every client is redis-py's
``Sentinel(...).master_for(...)``: each new connection asks the Sentinels where the master is,
a connection to a master that died or was demoted fails (a connection error, or ``READONLY``
turned into one), and the pools re-ask every ``REDIS_SENTINEL_CHECK_S`` (:mod:`shared.sentinel`),
so the caller's own retry reaches the promoted replica without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
from loguru import logger
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.durability import AsyncWaitingRedis, Durability, WaitingRedis
from shared.errors import ConfigError, NotReplicatedError
from shared.redis_checks import check_eviction, describe_failure, tls_warnings
from shared.sentinel import async_master, sync_master
from shared.settings import AppSettings, RedisSettings

T = TypeVar("T")


def client_options(settings: RedisSettings) -> dict[str, Any]:
    """Keyword arguments shared by the sync and async clients."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_connect_timeout_s,
        "health_check_interval": settings.health_check_interval_s,
        "decode_responses": True,
    }
    if settings.uses_tls:
        options.update(settings.ssl_options())
    return options


def is_sentinel_url(url: str) -> bool:
    return url.startswith("sentinel://")


def sentinel_options(settings: RedisSettings, *, asyncio: bool = False) -> dict[str, Any]:
    """Connection arguments for the Sentinels themselves (not the master): timeouts, their own
    password and TLS. Also kombu's and Celery's ``sentinel_kwargs`` transport option.
    ``asyncio`` gives the asyncio flavour of ``Retry``: redis-py 8.2 warns about, and drops the
    policy of, a synchronous ``Retry`` handed to an asyncio client."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_connect_timeout_s,
        # One try per Sentinel per question: redis-py asks each Sentinel in turn anyway, and
        # every caller retries the whole question. Its default (10 tries with backoff per
        # Sentinel) made a wrong REDIS_SENTINEL_PASSWORD take 11 s to report.
        "retry": AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0),
    }
    if settings.sentinel_password is not None:
        options["password"] = settings.sentinel_password.get_secret_value()
    if settings.sentinel_tls:
        options.update(ssl=True, **settings.ssl_options())
    return options


def _master_options(settings: RedisSettings, url: str) -> dict[str, Any]:
    """The master's connection arguments from a ``sentinel://`` URL (its password and database
    ride in every part, kombu's convention) and the settings."""
    first = urlsplit(url.split(";", 1)[0])
    options = client_options(settings)  # with REDIS_SENTINEL_TLS: the REDIS_SSL_* options
    if first.password:
        options["password"] = unquote(first.password)
    if first.username:
        options["username"] = unquote(first.username)
    options["db"] = int(first.path.strip("/") or 0)
    return options


def _sentinel_hosts(url: str) -> list[tuple[str, int]]:
    hosts = []
    for part in url.split(";"):
        parts = urlsplit(part)
        hosts.append((parts.hostname or "localhost", parts.port or 26379))
    return hosts


def _master_name(settings: RedisSettings) -> str:
    if settings.sentinel_master is None:
        raise ConfigError("REDIS_SENTINEL_MASTER: not set (required with REDIS_SENTINELS)")
    return settings.sentinel_master


def durability(settings: RedisSettings) -> Durability | None:
    """The ``WAIT`` settings of every client (:mod:`shared.durability`); None when off."""
    if not settings.wait_replicas:
        return None
    return Durability(settings.wait_replicas, settings.wait_timeout_ms, settings.sentinel_check_s)


def create_redis(settings: RedisSettings, url: str | None = None) -> redis.Redis:
    """A blocking client for ``url`` (default: the configured server, through Sentinel when it
    is configured). With ``REDIS_WAIT_REPLICAS`` its writes wait for replicas. Never call it on
    the event loop; use :func:`create_async_redis` there."""
    target = url or settings.connection_url()
    waits = durability(settings)
    cls = redis.Redis if waits is None else WaitingRedis
    if is_sentinel_url(target):
        client = sync_master(
            _sentinel_hosts(target),
            _master_name(settings),
            sentinel_options(settings),
            settings.sentinel_check_s,
            settings.sentinel_tls,
            cls,
            **_master_options(settings, target),
        )
    else:
        client = cls.from_url(target, **client_options(settings))
    if isinstance(client, WaitingRedis):
        client.durability = waits
    return client


def create_async_redis(settings: RedisSettings, url: str | None = None) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` (default: the configured server, through Sentinel when it
    is configured); with ``REDIS_WAIT_REPLICAS`` its writes wait for replicas."""
    target = url or settings.connection_url()
    waits = durability(settings)
    cls = redis.asyncio.Redis if waits is None else AsyncWaitingRedis
    if is_sentinel_url(target):
        client = async_master(
            _sentinel_hosts(target),
            _master_name(settings),
            sentinel_options(settings, asyncio=True),
            settings.sentinel_check_s,
            settings.sentinel_tls,
            cls,
            **_master_options(settings, target),
        )
    else:
        client = cls.from_url(target, **client_options(settings))
    if isinstance(client, AsyncWaitingRedis):
        client.durability = waits
    return client


def check_redis(settings: RedisSettings, url: str | None = None) -> float:
    """PING once; return the round trip in milliseconds.

    Raises :class:`RedisAuthError` when the server rejects our credentials,
    :class:`ConfigError` when TLS is misconfigured (retrying cannot help either) and
    :class:`RedisUnavailableError` when it cannot be reached in time. Messages show the URL
    redacted (see :func:`shared.redis_checks.describe_failure`).
    """
    target = url or settings.connection_url()
    client = create_redis(settings, target)
    try:
        started = time.perf_counter()
        client.ping()
        return (time.perf_counter() - started) * 1000
    except (redis.RedisError, OSError) as exc:
        raise describe_failure(exc, target, settings) from None
    finally:
        client.close()


def preflight(settings: AppSettings, *, result_backend: bool = True) -> str | None:
    """What every process checks before it starts work: chronoq's Redis, the broker and (unless
    ``result_backend`` is False: the scheduler never reads results) the result backend answer
    (raises as :func:`check_redis`), the broker's eviction policy is safe (raises
    :class:`ConfigError`, see :func:`shared.redis_checks.check_eviction`), and TLS warnings are
    logged. Returns the eviction policy (None if the server would not say)."""
    for warning in tls_warnings(settings.redis):
        logger.warning("{}", warning)
    backend = (settings.result_backend_url(),) if result_backend else ()
    urls = dict.fromkeys((settings.redis.connection_url(), settings.broker_url(), *backend))
    for url in urls:
        check_redis(settings.redis, url)
    client = create_redis(settings.redis, settings.broker_url())
    try:
        return check_eviction(client, settings.redis, settings.broker_url())
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise describe_failure(exc, settings.broker_url(), settings.redis) from None
    finally:
        client.close()


def raise_if_cancelling() -> None:
    """Raise the cancellation of the current task if one is pending but was swallowed.

    redis-py swallows a task's cancellation that lands inside a command: its connection-error
    retry catches what the cancelled read turns into and runs the command again, which then
    succeeds. The task goes on as if nothing happened, and on Python 3.11 every later
    ``cancel()`` is ignored because one is already counted as pending: shutdown hangs. So every
    long-running loop that talks to Redis calls this once per iteration, and every handler of
    Redis errors calls it first.
    """
    import asyncio

    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@contextmanager
def resolve_redis(settings: AppSettings) -> Iterator[AppSettings]:
    """Yield settings that name a reachable Redis.

    With ``REDIS_URL`` set they are returned as they are. Without it the embedded server is
    started (or an already running one from another chronoq process is shared) for the life
    of the ``with`` block.
    """
    if settings.redis.url is not None or settings.redis.uses_sentinel:
        yield settings
        return
    from shared.embedded import EmbeddedRedis  # only needed without REDIS_URL

    with EmbeddedRedis(settings.redis.embedded_dir, settings.redis.server_bin) as url:
        logger.info("using embedded redis at {} (set REDIS_URL to use your own)", url)
        yield settings.with_redis_url(url)


def retry_through_restart(call: Callable[[], T], within_s: float, every_s: float = 0.2) -> T:
    """``call()`` (blocking), tried again every ``every_s`` for up to ``within_s`` while Redis
    cannot be reached (a restart, a failover); then its error is raised."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + every_s > deadline:
                raise
            time.sleep(every_s)


def retry_unconfirmed(call: Callable[[], T], within_s: float, every_s: float = 0.2) -> T:
    """``call()`` (blocking), tried again every ``every_s`` for up to ``within_s`` while its write
    is not confirmed by the replicas (:class:`~shared.errors.NotReplicatedError`: a failover
    under way moves the client meanwhile); then that error is raised."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except NotReplicatedError:
            if time.monotonic() + every_s > deadline:
                raise
            time.sleep(every_s)
