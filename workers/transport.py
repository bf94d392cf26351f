# mypy: disable-error-code="no-untyped-call"
"""The worker's Redis broker transport: kombu's, with two faults of it closed where they start.

Workers select it with ``broker_transport`` (``workers.main.create_worker_app``); producers
(the scheduler, the CLI, clients) keep kombu's own, since neither fault touches them.

1. **The reconnect race** (celery/kombu#582, celery/celery#4652, celery/celery#10205): when the
   broker connection drops, Celery's consumer collects the connection, which detaches the
   transport from it (``transport.client = None``), and then closes the channels. A channel
   that still holds unacknowledged messages restores them on close through a new connection
   pool whose parameters come from ``transport.client``: ``'NoneType' object has no attribute
   'hostname'``, which is no connection error, so it escapes the consumer's restart and ends
   the worker (with exit status 0). Each channel here keeps the connection parameters it was
   opened with and uses them once the transport has lost them. The restore then works, or
   fails with a Redis connection error that the consumer expects; either way the messages stay
   in kombu's unacked index, which hands them out again after the visibility timeout.
2. **A message taken when Redis goes away**: BRPOP removes a message from its queue, and kombu
   records it as unacknowledged (so that it comes back if the worker dies) in a second round
   trip. A BRPOP that Redis applied but whose reply never arrived (Redis shut down or killed,
   a failover, a dropped connection), or a record that failed, lost the message. Here the
   worker takes messages with :class:`workers.take.Taker`: one script removes the message
   and records it as unacknowledged in the same step, and :class:`QoS` does not record it again.
3. **Sentinel**: :class:`SentinelTransport` is kombu's ``sentinel://`` transport with the same
   channel. kombu's Sentinel channel reads the list of Sentinels from ``transport.client`` too
   (``client.alt``), so it is built from the channel's own connection the same way, and every
   pool it makes asks the Sentinels for the master: after a failover the consumer's reconnect
   lands on the promoted replica.
4. **A poison message**: one list item that is not a kombu message (not JSON, not an object,
   no ``properties``, a body that cannot be decoded) raised out of the event loop and ended
   the worker. Here it is set aside (:func:`workers.poison.set_aside`) and the worker goes on.
5. **A dropped pub/sub connection** (broadcast queues: remote control), as a Redis restart or a
   ``CLIENT KILL`` does: redis-py's retry reconnected it inside kombu's blocking read, which
   then waited for a broadcast for ever, and the worker's event loop with it (its queues filled
   up, nothing logged). Here the event loop's connections do not retry, so the error reaches
   Celery's consumer, which reconnects everything.
6. **The restore sweep's lock** (``unacked_mutex``): a sweep that Redis left in the middle kept
   it for kombu's 300 s, through the restart, and no sweep of any worker ran meanwhile (issue
   #23). :class:`QoS` sweeps under :data:`workers.restore.SWEEP_LOCK`, which owes the release
   until it has run, with a lock that expires after one sweep interval.
"""

from __future__ import annotations

import threading
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
import redis.sentinel
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.names import RedisKeys
from shared.sentinel import FencedConnection, FencedSSLConnection, master_moved, refused
from workers.poison import PoisonSink
from workers.restore import SWEEP_LOCK
from workers.take import Taker

KEY_PREFIX_OPTION = "chronoq_key_prefix"
"""Transport option naming chronoq's key prefix, for the dead-letter list and the counter."""
SENTINELS_OPTION = "chronoq_sentinels"
"""Transport option: the Sentinels (``host:port``), so that the broker URL names only one."""
SENTINEL_CHECK_OPTION = "chronoq_sentinel_check_s"
"""Transport option: seconds between two questions to the Sentinels (``REDIS_SENTINEL_CHECK_S``)."""

_swap = threading.RLock()  # re-entered: the Sentinel pool builds its parameters inside the swap


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's QoS, which does not record again a message the take script recorded already."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()
        """Delivery tags the take recorded as unacknowledged, until the consumer appends them."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # kept in memory only
        else:
            super().append(message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # kombu's, under workers.restore.SWEEP_LOCK instead of kombu's Mutex, whose lock a
        # sweep cut by a Redis restart left held for unacked_mutex_expire (kombu: 300 s).
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with (
            self.channel.conn_or_acquire() as client,
            SWEEP_LOCK.held(client, self.unacked_mutex_key, self.unacked_mutex_expire) as locked,
        ):
            if not locked:
                return
            ceil = time() - self.visibility_timeout
            visible = client.zrange(
                self.unacked_index_key, ceil, 0, desc=True, byscore=True, offset=num and start, num=num
            )
            for tag in visible or []:
                self.restore_by_tag(tag, client)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # An ack (no pipe given) without MULTI: a Redis at maxmemory refuses every command
        # queued in a transaction, so kombu's acks failed there and ended the worker. The hash
        # entry goes first: an index entry left alone is dropped by the next restore sweep.
        if pipe is not None:
            return super()._remove_from_indices(delivery_tag, pipe)
        with self.channel.conn_or_acquire() as client:
            return (
                client.pipeline(transaction=False)
                .hdel(self.unacked_key, delivery_tag)
                .zrem(self.unacked_index_key, delivery_tag)
            )


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, KEY_PREFIX_OPTION)  # type: ignore[assignment]
    chronoq_key_prefix = "chronoq:"

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._conninfo = connection.client  # before super(): it may connect already
        super().__init__(connection, *args, **kwargs)
        self._poison = PoisonSink(self.chronoq_key_prefix)
        self._no_ack_queues: set[str] = set()
        prefix = self.global_keyprefix or ""
        self._taker = Taker(prefix, self.unacked_key, self.unacked_index_key, RedisKeys(self.chronoq_key_prefix).idle)

    def _connparams(self, asynchronous: bool = False) -> Any:
        params = self._attached(super()._connparams, asynchronous=asynchronous)
        if asynchronous:
            # The event loop's connections (the take's, the pub/sub one of broadcast queues) never
            # retry: on a dropped pub/sub connection redis-py reconnected inside kombu's read and
            # then waited there for a broadcast, hanging the worker (see the module docstring).
            params["retry"] = Retry(NoBackoff(), 0)
        return params

    def _attached(self, method: Any, **kwargs: Any) -> Any:
        """``method(**kwargs)``, which reads ``transport.client``, run with the connection this
        channel was opened with when the transport was detached from it (see the module
        docstring)."""
        transport = self.connection
        if transport.client is not None or self._conninfo is None:
            return method(**kwargs)
        with _swap:
            transport.client = self._conninfo
            try:
                return method(**kwargs)
            finally:
                transport.client = None

    def _brpop_start(self, timeout: Any = None) -> None:
        # kombu's _brpop_start, with the take (and its doorbell) instead of BRPOP.
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        pairs = [(self._q_for_pri(queue, pri), queue) for pri in self.priority_steps for queue in queues]
        keys, acked = [key for key, _ in pairs], [queue not in self._no_ack_queues for _, queue in pairs]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self._taker.send(self.client.connection, keys, acked, self.brpop_timeout if timeout is None else timeout)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        # What a no_ack consumer takes (Celery's remote-control replies) is never acknowledged:
        # the take must not record it, or it would come back after the visibility timeout.
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's _brpop_read for the take, except that an item that is no message is set aside
        # instead of raising out of the event loop (the take removed it from the queue already).
        try:
            try:
                taken = self._taker.read(self.client, self.client.connection)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except redis.ResponseError as exc:
                # The take writes: a master fenced by min-replicas-to-write (as for a planned
                # failover) or a replica refuses it. Reconnect as after a dropped connection,
                # asking the Sentinels again, instead of ending the consumer.
                if not (refused(exc) or isinstance(exc, redis.exceptions.ReadOnlyError)):
                    raise
                self.client.connection.disconnect()
                raise redis.ConnectionError(f"Redis refuses the take: {exc}") from exc
            dest = taken.list_key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._deliver_taken(taken.item, dest, taken.recorded)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _deliver_taken(self, item: bytes, dest: str, recorded: bool) -> None:
        message = self._parse(item, dest)
        tag = None
        if recorded:
            if message is None:  # set aside: nothing is to come back after the visibility timeout
                self.qos._remove_from_indices(loads(bytes_to_str(item))["properties"]["delivery_tag"]).execute()
                return
            tag = message["properties"]["delivery_tag"]
            self.qos.recorded.add(tag)
        if message is None:
            return
        try:
            self.connection._deliver(message, dest)
        finally:
            if tag is not None:
                self.qos.recorded.discard(tag)

    def _get(self, queue: str, timeout: Any = None) -> Any:
        # The synchronous path (drain_events without the event loop) reads one item the same way.
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    message = self._parse(item, queue)
                    if message is not None:
                        return message
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _parse(self, item: bytes | str, queue: str) -> dict[str, Any] | None:
        """The message in a list item, or None once an item that is none has been set aside."""
        raw = item if isinstance(item, bytes) else item.encode("utf-8", "surrogateescape")
        try:
            message = loads(bytes_to_str(item))
            # What kombu's Message reads when the consumer receives it: fail here, not there.
            self.Message(message, channel=self)
        except Exception as exc:  # whatever the item makes kombu raise is the item's fault
            self._poison.set_aside(self._poison_client, raw, queue, type(exc).__name__)
            return None
        return message  # type: ignore[no-any-return]

    def _poison_client(self) -> Any:
        return self._create_client()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """kombu's Sentinel channel with the fixes of :class:`Channel` (method order: ours first)."""

    # A fenced master's NOREPLICAS (planned-failover.sh, before its replica is promoted) reads
    # as a lost connection, as for the scheduler's clients: an ack or a take is a pipeline, and
    # its ResponseError ended the Celery worker (exit 70); a ConnectionError makes its consumer
    # reconnect. kombu's asynchronous pool subclasses these with its disconnect hook.
    connection_class = FencedConnection
    connection_class_ssl = FencedSSLConnection  # type: ignore[assignment]

    from_transport_options = tuple(  # type: ignore[assignment]
        dict.fromkeys(
            (
                *Channel.from_transport_options,
                *kombu_redis.SentinelChannel.from_transport_options,
                SENTINEL_CHECK_OPTION,
                SENTINELS_OPTION,
            )
        )
    )

    chronoq_sentinel_check_s = 0.5

    chronoq_sentinels: tuple[str, ...] = ()

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        return self._attached(self._master_pool, asynchronous=asynchronous)

    def _master_pool(self, asynchronous: bool = False) -> Any:
        """kombu's ``_sentinel_managed_pool`` with the Sentinels from the transport option
        ``chronoq_sentinels`` instead of the broker URL's ``;``-separated list: given such a
        list, kombu's reconnect walks it as fail-over URLs, and each one it switches to is
        opened with the URL's own transport (kombu's ``sentinel://``), not this one, and so
        without the fixes above (a message kept as Redis went away was never re-queued)."""
        if not self.chronoq_sentinels:
            return super()._sentinel_managed_pool(asynchronous=asynchronous)
        params = {k: v for k, v in self._connparams(asynchronous).items() if k not in ("host", "port")}
        hosts = [(host, int(port)) for host, _, port in (entry.rpartition(":") for entry in self.chronoq_sentinels)]
        manager = redis.sentinel.Sentinel(
            hosts,
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            **params,
        )
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        master_name = getattr(self, "master_name", None)
        if master_name is None:
            raise ValueError("'master_name' transport option must be specified.")
        return manager.master_for(master_name, redis.Redis, **credentials).connection_pool

    def _brpop_start(self, timeout: Any = None) -> Any:
        # The consuming connection is kept for good and opened once: after a graceful failover
        # it would go on taking messages from the old master (still up, see shared.sentinel).
        # Between two polls, at most every chronoq_sentinel_check_s, ask the Sentinels; if the master
        # moved, fail like a dropped connection so the consumer reconnects to the new one.
        now = monotonic()
        if now >= getattr(self, "_next_master_check", 0.0):
            self._next_master_check = now + self.chronoq_sentinel_check_s
            if master_moved(self.client.connection_pool, self.client.connection):
                logger.warning("the Redis master moved (Sentinel); reconnecting")
                self.client.connection.disconnect()
                raise redis.ConnectionError("the Redis master moved (Sentinel)")
        return super()._brpop_start(timeout)


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
