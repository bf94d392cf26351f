"""BatchPublisher: put encoded task messages on the Redis broker, one pipeline per batch.

The scheduler never uses this (it pushes each message inside the Lua script that decides its
fire); it is for benchmarks, tests and tools that want ``send_task``'s messages without its cost
per message. It owns the Redis client it creates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery

from scheduler.encoder import MessageEncoder
from scheduler.message import TaskMessage
from shared.errors import DispatchError

DEFAULT_BATCH_SIZE = 1000
"""Messages per pipeline: big enough to amortise the round trip, small enough that one failed
batch (which may have partly landed) stays a small retry."""

RedisFactory = Callable[[], redis.Redis]


class BatchPublisher:
    """Publish :class:`TaskMessage` batches to the broker of a configured Celery app.

    ``broker`` is the Redis to publish to: a URL, or a factory returning a redis-py client (for
    example ``lambda: create_redis(settings.redis, settings.broker_url())``); None uses the app's
    ``broker_write_url``/``broker_url`` with the socket timeouts and TLS options of its
    ``broker_transport_options``/``broker_use_ssl``. The publisher owns that client and closes it
    in :meth:`close` (or on leaving a ``with`` block). ``batch_size`` is the number of messages
    per pipeline (one round trip). Thread-safe: each :meth:`publish` takes its own pipeline.
    """

    def __init__(
        self, app: Celery, broker: str | RedisFactory | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.encoder = MessageEncoder(app)
        self._batch_size = batch_size
        if callable(broker):
            self._client = broker()
        else:
            conf = app.conf
            with app.connection_for_write() as connection:
                options = dict(connection.transport_options)
            url = broker or conf.broker_write_url or conf.broker_url
            tls = conf.broker_use_ssl if isinstance(conf.broker_use_ssl, dict) else {}
            self._client = _redis_from_url(url, options, tls)

    def __enter__(self) -> BatchPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis client this publisher created."""
        self._client.close()

    def encode(self, messages: Sequence[TaskMessage]) -> list[tuple[str, str]]:
        """:meth:`MessageEncoder.encode`."""
        return self.encoder.encode(messages)

    def queue_keys(self, queue_name: str) -> list[str]:
        """:meth:`MessageEncoder.queue_keys`."""
        return self.encoder.queue_keys(queue_name)

    def publish(self, messages: Sequence[TaskMessage]) -> None:
        """Put every message on its queue; blocking (call it off the event loop).

        Every message is encoded before anything is sent, so a bad message raises with nothing
        published: ``kombu.exceptions.EncodeError`` for arguments JSON cannot encode,
        ``ValueError`` for a header that clashes with the protocol's, ``QueueNotFound`` for an
        unknown queue with ``task_create_missing_queues`` off. Messages then go in pipelines of
        ``batch_size``, one round trip each, keeping their order within a queue.

        Raises :class:`DispatchError` (``__cause__`` is the redis-py error) when Redis fails; the
        batch in flight may have partly landed, so publish *all* ``messages`` again: duplicates
        carry the same task id. The message says how many were confirmed before the failure.
        """
        encoded = self.encoder.encode(messages)
        done = 0
        for start in range(0, len(encoded), self._batch_size):
            batch = encoded[start : start + self._batch_size]
            # One LPUSH per list with many values: the same order as one LPUSH per message (the
            # consumer pops from the tail), far fewer commands for Redis to parse.
            by_key: dict[str, list[str]] = {}
            for key, payload in batch:
                by_key.setdefault(key, []).append(payload)
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for key, payloads in by_key.items():
                        pipe.lpush(key, *payloads)
                    pipe.execute()
            except redis.RedisError as exc:
                raise DispatchError(
                    f"publishing {len(encoded)} task messages failed after {done} were confirmed; the next "
                    f"{len(batch)} may be partly on the broker. Publish all {len(encoded)} again (same "
                    f"task ids, duplicates are harmless). Redis said: {exc}"
                ) from exc
            done += len(batch)


def _redis_from_url(url: str, transport: dict[str, Any], tls: dict[str, Any]) -> redis.Redis:
    """A client for the broker URL with the timeouts kombu would use, so a dead Redis fails fast."""
    options: dict[str, Any] = {
        name: transport[name]
        for name in ("socket_timeout", "socket_connect_timeout")
        if transport.get(name) is not None
    }
    if url.startswith("rediss://"):
        options.update(tls)
    return redis.Redis.from_url(url, **options)
