"""The scheduler's start-up checks of Redis: wait while it is unavailable, stop at once when
retrying cannot help.

A replica started before its Redis waits for it (a fleet restarts in any order). A wrong
password, a TLS mistake (wrong CA, ``redis://`` to a TLS port or the reverse), a broker on
another database or an evicting ``maxmemory-policy`` are configuration errors: they are raised
as they are, and the process exits 78 with one line naming the setting.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from loguru import logger

from shared.errors import ConfigError, RedisUnavailableError
from shared.redis import preflight, raise_if_cancelling
from shared.redis_checks import is_config_error
from shared.settings import AppSettings

RETRY_MAX_S = 10.0


async def wait_for_redis(settings: AppSettings) -> str | None:
    """Retry :func:`shared.redis.preflight` (off the event loop) until Redis answers, logging each
    failure; return the broker's eviction policy (None if the server would not say).

    Raises :class:`ConfigError` or :class:`shared.errors.RedisAuthError` at once."""
    check_one_redis(settings)
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(lambda: preflight(settings, result_backend=False))
        except RedisUnavailableError as exc:
            if is_config_error(exc):
                raise
            raise_if_cancelling()
            logger.warning("{}; retrying in {:.1f}s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


def check_one_redis(settings: AppSettings) -> None:
    """Deciding a fire and publishing it are one Lua script, so the broker must be the Redis
    server and database that holds chronoq's state. Raises :class:`ConfigError`."""

    def where(url: str) -> tuple[str | None, int | None, str]:
        parts = urlsplit(url)
        return parts.hostname, parts.port or 6379, (parts.path.strip("/") or "0")

    if where(settings.broker_url()) != where(settings.redis.connection_url()):
        raise ConfigError(
            "CELERY_BROKER_URL must name the same Redis server and database as REDIS_URL: chronoq decides and "
            "publishes each fire in one atomic step, so its state lives next to the queues"
        )
