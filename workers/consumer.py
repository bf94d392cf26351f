"""The worker's Celery consumer: no message body in any log, poison counted, quick reconnects.

Celery's consumer logs the whole body of a message it refuses (a pickle, a body that is not
JSON, an unregistered task), and a body may carry secrets. Here each is one line with the task
name or the size and a hash, the unreadable ones are set aside (:mod:`workers.poison`), and the
unregistered task's ``task_unknown`` signal still goes out (the fire ledger records the fire
failed and frees its slot, see :meth:`workers.lease.WorkerFleet.on_unknown`).

After the broker connection drops, Celery retries at 2, 4, 6... s (kombu's defaults, which
Celery does not let you set), so workers came back about 13 s after a 5 s Redis restart. Here
the retries are :data:`RECONNECT_INTERVAL_START_S` apart, growing to at most
:data:`RECONNECT_INTERVAL_MAX_S`.

On that reconnect Celery (5.7) logged ``Error on restarting Gossip: AttributeError`` with a
traceback: the consumer forgets its dead connection (``c.connection = None``) before it stops
its steps, and the Gossip step closes its channel with ``ignore_errors(c.connection, ...)``,
which, when the close fails on the dead connection (it does: it deletes the gossip queue),
reads ``None.connection_errors``. :class:`Gossip` ignores the errors the consumer itself knows
(``ignore_errors(c, ...)``, as Celery's other steps do).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from celery import signals
from celery.exceptions import NotRegistered
from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer import Gossip as CeleryGossip
from kombu.common import ignore_errors
from loguru import logger

from workers.poison import PoisonSink
from workers.transport import KEY_PREFIX_OPTION

RECONNECT_INTERVAL_START_S = 0.5
RECONNECT_INTERVAL_STEP_S = 0.5
RECONNECT_INTERVAL_MAX_S = 1.0


class Gossip(CeleryGossip):  # type: ignore[misc]
    """Celery's Gossip step, whose stop after a dropped connection no longer raises (see the
    module docstring)."""

    def _close(self, c: Any, cancel_consumers: bool = True) -> None:
        channels = set()
        for consumer in self.consumers or []:
            if cancel_consumers:
                ignore_errors(c, consumer.cancel)  # type: ignore[no-untyped-call]
            if consumer.channel:
                channels.add(consumer.channel)
        for channel in channels:
            ignore_errors(c, channel.close)  # type: ignore[no-untyped-call]


class Consumer(CeleryConsumer):  # type: ignore[misc]
    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = [
            "workers.consumer:Gossip" if step == "celery.worker.consumer.gossip:Gossip" else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = partial(
            type(conn).ensure_connection,
            conn,
            interval_start=RECONNECT_INTERVAL_START_S,
            interval_step=RECONNECT_INTERVAL_STEP_S,
            interval_max=RECONNECT_INTERVAL_MAX_S,
        )
        return super().ensure_connected(conn)

    # -- messages Celery refuses -------------------------------------------------------------
    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._set_aside(message, f"{type(exc).__name__} (content type {message.content_type})")
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._set_aside(message, f"{type(exc).__name__} (content type {message.content_type})")
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._set_aside(message, "not a task message")
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        # Celery's version, minus the body and headers in the log line.
        headers = message.headers or {}
        try:
            id_, name = headers["id"], headers["task"]
        except KeyError:  # protocol 1: no headers, the body says it
            self._set_aside(message, "unregistered task of protocol 1")
            message.reject_log_error(logger, self.connection_errors)
            return
        logger.error(
            "unregistered task {} task_id={} job_id={}: message dropped (is its module in TASK_MODULES?)",
            name,
            id_,
            headers.get("job_id", "-"),
        )
        request = AttributeDict(
            name=name,
            chord=None,
            root_id=headers.get("root_id"),
            correlation_id=message.properties.get("correlation_id"),
            reply_to=message.properties.get("reply_to"),
            errbacks=None,
        )
        message.reject_log_error(logger, self.connection_errors)
        self.app.backend.mark_as_failure(id_, NotRegistered(name), request=request)
        if self.event_dispatcher:
            self.event_dispatcher.send("task-failed", uuid=id_, exception=f"NotRegistered({name!r})")
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=id_)

    def _set_aside(self, message: Any, reason: str) -> None:
        raw = getattr(message, "_raw", None)
        body = message.body or b""
        data = json.dumps(raw).encode() if isinstance(raw, dict) else body.encode() if isinstance(body, str) else body
        queue = (message.delivery_info or {}).get("routing_key") or "-"
        prefix = (self.app.conf.broker_transport_options or {}).get(KEY_PREFIX_OPTION, "chronoq:")
        PoisonSink(prefix).set_aside(message.channel._create_client, data, queue, reason)
