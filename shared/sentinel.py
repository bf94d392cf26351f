# mypy: disable-error-code="no-untyped-call"
"""Redis Sentinel clients that follow the master when it moves, sync and asyncio.

redis-py's Sentinel pool asks the Sentinels where the master is only when it opens a
connection. After a SIGKILL that is enough: every connection breaks and reconnects to the
promoted replica. After a graceful ``SENTINEL FAILOVER`` it is not: the old master stays up,
keeps its clients and accepts their writes for many seconds (Redis 7.0's Sentinel demotes it
only after it has reported itself a master for several of its info periods; measured here: not
within 12 s), and everything written there is discarded when it finally resyncs as a replica.
So each pool here asks the Sentinels again at most every ``REDIS_SENTINEL_CHECK_S`` when a
connection is taken, and when the master moved it drops its connections to the old one: the
next command goes to the new master. Writes between the promotion and the Sentinels announcing
it (about a second) can still land on the old master, unless it refuses them
(``min-replicas-to-write``, as ``deploy/redis/planned-failover.sh`` sets for a planned switch):
a ``NOREPLICAS`` refusal is turned into a connection error here, so every caller retries it
(and reconnects, asking the Sentinels) as it retries a dropped connection. See docs/sentinel.md.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis.asyncio.sentinel
import redis.sentinel
from celery.backends.redis import SentinelBackend


class _Due:
    """True at most once every ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


REFUSED = "NOREPLICAS"
"""The error of a master that refuses writes for want of replicas (``min-replicas-to-write``)."""


def refused(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and REFUSED in str(exc)


class FencedConnection(redis.sentinel.SentinelManagedConnection):  # type: ignore[misc]
    """A master connection that reads a ``NOREPLICAS`` refusal as a lost connection."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not refused(exc):
                raise
            self.disconnect()
            raise redis.ConnectionError(f"the master refuses writes: {exc}") from exc


class FencedSSLConnection(FencedConnection, redis.SSLConnection):  # type: ignore[misc]
    pass


class AsyncFencedConnection(redis.asyncio.sentinel.SentinelManagedConnection):  # type: ignore[misc]
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not refused(exc):
                raise
            await self.disconnect()
            raise redis.ConnectionError(f"the master refuses writes: {exc}") from exc


class AsyncFencedSSLConnection(AsyncFencedConnection, redis.asyncio.SSLConnection):  # type: ignore[misc]
    pass


class FollowingPool(redis.sentinel.SentinelConnectionPool):  # type: ignore[misc]
    """A master pool that re-asks the Sentinels every ``check_s`` when a connection is taken."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        self._due = _Due(kwargs.pop("check_s", 0.5))
        super().__init__(service_name, sentinel_manager, **kwargs)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.proxy.master_address is not None and self._due():
            # On a change redis-py records the new address and drops the idle connections;
            # connections in use are dropped when they come back (owns_connection). No
            # Sentinel answering: carry on with the master we know.
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                self.proxy.get_master_address()
        return super().get_connection(*args, **kwargs)


class AsyncFollowingPool(redis.asyncio.sentinel.SentinelConnectionPool):  # type: ignore[misc]
    """:class:`FollowingPool` for asyncio clients."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        self._due = _Due(kwargs.pop("check_s", 0.5))
        super().__init__(service_name, sentinel_manager, **kwargs)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.master_address is not None and self._due():
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                await self.get_master_address()
        return await super().get_connection(*args, **kwargs)


def master_moved(pool: Any, connection: Any) -> bool:
    """Whether the Sentinels now name another master than the one ``connection`` (of a
    Sentinel ``pool``, such as kombu's) is connected to. Asks them; False when none answers."""
    if getattr(connection, "host", None) is None or not hasattr(pool, "sentinel_manager"):
        return False
    try:
        address = pool.sentinel_manager.discover_master(pool.service_name)
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    return (str(address[0]), int(address[1])) != (str(connection.host), int(connection.port))


def sync_master(
    hosts: list[tuple[str, int]],
    master: str,
    sentinel_kwargs: dict[str, Any],
    check_s: float,
    tls: bool,
    redis_class: type[redis.Redis] = redis.Redis,
    **options: Any,
) -> redis.Redis:
    """A client (of ``redis_class``) of the master named ``master``, found through the
    Sentinels at ``hosts``."""
    sentinel = redis.sentinel.Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
    client: redis.Redis = sentinel.master_for(
        master,
        redis_class=redis_class,
        connection_pool_class=FollowingPool,
        connection_class=FencedSSLConnection if tls else FencedConnection,
        check_s=check_s,
        **options,
    )
    return client


def async_master(
    hosts: list[tuple[str, int]],
    master: str,
    sentinel_kwargs: dict[str, Any],
    check_s: float,
    tls: bool,
    redis_class: type[redis.asyncio.Redis] = redis.asyncio.Redis,
    **options: Any,
) -> redis.asyncio.Redis:
    """:func:`sync_master` for asyncio."""
    sentinel = redis.asyncio.sentinel.Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
    client: redis.asyncio.Redis = sentinel.master_for(
        master,
        redis_class=redis_class,
        connection_pool_class=AsyncFollowingPool,
        connection_class=AsyncFencedSSLConnection if tls else AsyncFencedConnection,
        check_s=check_s,
        **options,
    )
    return client


class ResultBackend(SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel result backend with the pool and connections above: it follows the
    master after a graceful failover and retries a write a fenced master refuses. (Celery's
    own stays on the old master, whose refusals fail the task outside its body.) Selected by
    ``result_backend = "shared.sentinel:ResultBackend+sentinel://..."``; the transport option
    ``chronoq_sentinel_check_s`` is ``REDIS_SENTINEL_CHECK_S``."""

    def _get_pool(self, **params: Any) -> Any:
        sentinel = self._get_sentinel_instance(**params)
        tls = isinstance(params.get("connection_class"), type) and issubclass(
            params["connection_class"], redis.SSLConnection
        )
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        return sentinel.master_for(
            self._transport_options.get("master_name"),
            redis_class=self._get_client(),
            connection_pool_class=FollowingPool,
            connection_class=FencedSSLConnection if tls else FencedConnection,
            check_s=self._transport_options.get("chronoq_sentinel_check_s", 0.5),
            **credentials,
        ).connection_pool
