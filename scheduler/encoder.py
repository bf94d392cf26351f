"""MessageEncoder: Celery task messages encoded exactly as kombu's Redis transport would push them.

``app.send_task`` costs several Redis round trips and a lot of Python per message. The scheduler
pushes each message inside the Lua script that decides its fire, so all it needs is the bytes:
this module builds each message with Celery's own protocol-2 code
(``app.amqp.create_task_message``) and finishes it the way kombu's Redis transport does
(``Producer.publish`` -> ``Channel.prepare_message`` -> ``basic_publish`` -> ``_put``). A worker
cannot tell the difference: same headers (custom ones merged at the top level, where
``task.request`` exposes them), same properties and ``delivery_info``, same base64 JSON body,
same list key, priority lists included. The transport options kombu reads (``sep``,
``priority_steps``, ``global_keyprefix``, ``body_encoding``) are read from the app's
``broker_transport_options`` the same way. The encoder owns no Redis client;
:mod:`scheduler.publishing` pushes encoded messages itself (benchmarks and tests).

What ``send_task`` does and this does not, on purpose: it fires no ``before/after_task_publish``
signals, sends no ``task-sent`` event (Flower sees a task once a worker receives it), does not
subscribe the result backend to the task (``AsyncResult.get`` still works, it polls first), and
declares no queue (workers declare the queues they consume). Only direct queues without
``x-expires`` are supported, JSON only, no compression: anything else raises at once.
"""

from __future__ import annotations

import functools
import json
import json.encoder
from bisect import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import entity, serialization
from kombu.exceptions import EncodeError
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json

from scheduler.message import TaskMessage

TEMPLATE_CACHE_SIZE = 10_000
"""Message templates kept (one per shape of message); the cache starts over when full."""
BODY_CACHE_SIZE = 20_000
"""Distinct argument lists whose encoded body and reprs are kept; starts over when full."""
_NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# kombu is untyped: give the functions used here the types they have.
_serialize: Callable[..., tuple[str, str, str]] = serialization.dumps
_delivery_mode: Callable[[Any], int] = entity.maybe_delivery_mode
# kombu.utils.json.dumps(x) is JSONEncoder().encode(x); one shared encoder saves building one per
# message (encode() keeps no state, so threads may share it).
_json_encode: Callable[[Any], str] = kombu_json.JSONEncoder().encode


@dataclass(frozen=True, slots=True)
class _Route:
    """Where one queue's messages go: the anonymous exchange, routing key = queue name."""

    routing_key: str
    keys_by_step: dict[int, str]
    delivery_mode: int


class MessageEncoder:
    """Encode :class:`TaskMessage` objects for the broker of a configured Celery app.

    Creating an encoder connects to nothing (it reads the app's transport options once).
    Thread-safe: the only shared state is caches of per-queue routes, templates and bodies (two
    threads may both compute an entry; they compute the same thing).

    Raises ``ValueError`` when the app is not set up for protocol 2, JSON and no compression.
    """

    def __init__(self, app: Celery) -> None:
        conf = app.conf
        if conf.task_protocol != 2 or conf.task_serializer != "json" or conf.task_compression:
            raise ValueError(
                "MessageEncoder needs task_protocol=2, task_serializer='json' and no task_compression "
                f"(got {conf.task_protocol}, {conf.task_serializer!r}, {conf.task_compression!r})"
            )
        with app.connection_for_write() as connection:
            channel_cls = connection.transport.Channel
            options = dict(connection.transport_options)
        if not issubclass(channel_cls, kombu_redis.Channel):
            raise ValueError(f"MessageEncoder only speaks kombu's Redis transport, not {channel_cls.__module__}")

        def option(name: str) -> Any:
            # The same precedence as kombu's Channel.__init__: transport option, else class default.
            return options.get(name, getattr(channel_cls, name))

        self._app = app
        self._sep: str = option("sep")
        self._steps: list[int] = list(option("priority_steps"))
        self._key_prefix: str = option("global_keyprefix") or ""
        body_encoding: str | None = option("body_encoding")
        self._body_encoding = body_encoding
        # kombu's Channel.encode_body: any encoding but utf-8 (default base64) goes through a codec.
        self._body_codec: Any = (
            channel_cls.codecs[body_encoding] if body_encoding and body_encoding.lower() != "utf-8" else None
        )
        self._default_priority: int = channel_cls.default_priority
        self._unacked = (self._key_prefix + option("unacked_key"), self._key_prefix + option("unacked_index_key"))
        self._routes: dict[str, _Route] = {}
        self._templates: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._bodies: dict[str, tuple[str, str, str]] = {}
        self._create_task_message: Callable[..., Any] = app.amqp.create_task_message  # protocol 2
        # Read once: each lookup in Celery's layered config costs more than building a message.
        self._repr_maxlevels: int = conf.task_repr_maxlevels
        self._timezone: tzinfo = app.timezone
        self._argsrepr_maxsize: int = app.amqp.argsrepr_maxsize
        self._kwargsrepr_maxsize: int = app.amqp.kwargsrepr_maxsize

    def encode(self, messages: Sequence[TaskMessage]) -> list[tuple[str, str]]:
        """Each message as the Redis list key and the JSON payload kombu would LPUSH there:
        the scheduler pushes it inside the script that decides a fire, so deciding and publishing
        are one step. Pure CPU. Raises for a bad message: ``kombu.exceptions.EncodeError`` for
        arguments JSON cannot encode, ``ValueError`` for a header that clashes with the
        protocol's, ``QueueNotFound`` for an unknown queue with ``task_create_missing_queues`` off.

        The first message of each shape (task, queue, limits, priority, header names) is built
        by Celery's own ``as_task_v2`` and kept as a template: its JSON with a slot for each value
        that differs per message (ids, body and its reprs, custom headers, expiry, delivery tag).
        Later ones fill the slots with one string format: the same bytes, ~15 µs a message here
        (copying the decoded template and encoding it took ~30 µs). There are few shapes (not
        one per job), so the templates take no memory to speak of."""
        reply_to = self._app.thread_oid  # what send_task puts in reply_to: per thread, per app
        origin = anon_nodename()  # what as_task_v2 would compute per message: pid and host
        now: datetime | None = None
        encoded = []
        for message in messages:
            shape = (
                message.task_name,
                message.queue,
                message.priority,
                message.time_limit_s,
                message.soft_time_limit_s,
                message.expires_s is None,
                tuple(message.headers),
                reply_to,
            )
            template = self._templates.get(shape)
            if template is None:
                key, payload = self._encode(message, reply_to, origin)
                if len(self._templates) >= TEMPLATE_CACHE_SIZE:
                    self._templates.clear()
                self._templates[shape] = (key, _compile(json.loads(payload), message))
                encoded.append((key, payload))
                continue
            if now is None and message.expires_s is not None:
                now = datetime.now(UTC)  # what app.now() returns, for a tenth of its cost
            encoded.append((template[0], self._from_template(message, template[1], now)))
        return encoded

    def _from_template(self, message: TaskMessage, template: str, now: datetime | None) -> str:
        """The payload of ``message`` from its shape's template: every value that differs per
        message is put in as the JSON the encoder would write for it."""
        values = dict(zip(_header_slots(len(message.headers)), map(_quote, message.headers.values()), strict=True))
        values["task_id"] = _quote(message.task_id)
        values["body"], values["argsrepr"], values["kwargsrepr"] = self._body_of(message)
        if message.expires_s is not None and now is not None:
            # celery's add_seconds_to_datetime: elapsed seconds added in UTC, shown in the app's zone.
            expires = (now + timedelta(seconds=message.expires_s)).astimezone(self._timezone)
            values["expires"] = _quote(expires.isoformat())
            values["expiration"] = _quote(str(int(max(message.expires_s, 0) * 1000)))
        values["delivery_tag"] = _quote(message.delivery_tag or message.task_id)
        return template % values

    def _body_of(self, message: TaskMessage) -> tuple[str, str, str]:
        """The encoded body and the args/kwargs reprs, each as a JSON string, cached by the
        arguments' JSON (a job's fires all carry the same arguments)."""
        try:
            arguments = _json_encode([message.args, message.kwargs])
        except (TypeError, ValueError) as exc:
            raise EncodeError(exc) from exc  # what kombu raises for it on the first path
        cached = self._bodies.get(arguments)
        if cached is None:
            # The body as create_task_message builds it, serialized and encoded as in _encode.
            _, _, body = _serialize((message.args, message.kwargs, _NO_EMBED), serializer="json")
            if self._body_codec is not None:
                body = self._body_codec.encode(body)
            cached = (
                _quote(body),
                _quote(self._repr(message.args, self._argsrepr_maxsize)),
                _quote(self._repr(message.kwargs, self._kwargsrepr_maxsize)),
            )
            if len(self._bodies) >= BODY_CACHE_SIZE:
                self._bodies.clear()
            self._bodies[arguments] = cached
        return cached

    def _encode(self, message: TaskMessage, reply_to: str, origin: str) -> tuple[str, str]:
        """The list key and the JSON payload kombu's Redis transport would LPUSH for ``message``."""
        route = self._route(message.queue)
        headers, properties, body, _ = self._create_task_message(
            message.task_id,
            message.task_name,
            message.args,
            message.kwargs,
            expires=message.expires_s,
            reply_to=reply_to,
            time_limit=message.time_limit_s,
            soft_time_limit=message.soft_time_limit_s,
            ignore_result=None,  # send_task passes None when the caller does not say
            origin=origin,
            # The reprs as_task_v2 computes itself, but with the limits read once (see __init__).
            argsrepr=self._repr(message.args, self._argsrepr_maxsize),
            kwargsrepr=self._repr(message.kwargs, self._kwargsrepr_maxsize),
        )
        clash = headers.keys() & message.headers.keys()
        if clash:
            raise ValueError(f"task {message.task_id}: headers {sorted(clash)} would overwrite Celery's own")
        headers.update(message.headers)  # send_task_message merges custom headers the same way
        # Key order as kombu builds the dict, so the JSON is the same byte for byte but for ids.
        properties["delivery_mode"] = route.delivery_mode
        if message.expires_s is not None:
            # send_task also sets the AMQP TTL, clamped at 0; Redis ignores it, the worker uses
            # the ``expires`` header.
            properties["expiration"] = str(int(max(message.expires_s, 0) * 1000))
        properties["delivery_info"] = {"exchange": "", "routing_key": route.routing_key}
        priority = message.priority or self._default_priority
        properties["priority"] = priority
        content_type, content_encoding, payload = _serialize(body, serializer="json")
        if self._body_codec is not None:
            payload = self._body_codec.encode(payload)
        properties["body_encoding"] = self._body_encoding
        properties["delivery_tag"] = message.delivery_tag or message.task_id
        envelope = {
            "body": payload,
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": properties,
        }
        step = self._steps[bisect(self._steps, priority) - 1]  # kombu's Channel.priority()
        return route.keys_by_step[step], _json_encode(envelope)

    def _repr(self, value: Any, maxsize: int) -> str:
        """Celery's ``saferepr``, as as_task_v2 computes ``argsrepr``/``kwargsrepr``."""
        if not value and type(value) in (list, dict):
            return "[]" if type(value) is list else "{}"  # saferepr's answer, at no cost: no kwargs is common
        result: str = saferepr(value, maxsize, maxlevels=self._repr_maxlevels)
        return result

    def queue_keys(self, queue_name: str) -> list[str]:
        """The broker lists holding ``queue_name``'s messages, one per priority step."""
        return list(dict.fromkeys(self._route(queue_name).keys_by_step.values()))

    def list_key(self, queue_name: str, priority: int | None) -> str:
        """The broker list a message of ``queue_name`` with ``priority`` is pushed to."""
        step = self._steps[bisect(self._steps, priority or self._default_priority) - 1]
        return self._route(queue_name).keys_by_step[step]

    def unacked_keys(self) -> tuple[str, str]:
        """kombu's unacked hash and its index, as the broker's workers name them (prefixed)."""
        return self._unacked

    def _route(self, queue_name: str) -> _Route:
        route = self._routes.get(queue_name)
        if route is not None:
            return route
        queue = self._app.amqp.queues[queue_name]  # creates a missing queue, as send_task does
        exchange = queue.exchange
        if exchange is not None and exchange.type != "direct":
            raise ValueError(
                f"queue {queue_name!r} is bound to a {exchange.type} exchange; only direct queues are supported"
            )
        if queue.expires is not None:
            raise ValueError(f"queue {queue_name!r} has x-expires; MessageEncoder does not refresh queue TTLs")
        # A direct queue is published on the anonymous exchange with the queue name as routing
        # key (send_task_message), which kombu's Redis transport maps straight to the list name.
        keys = {
            step: self._key_prefix + (f"{queue_name}{self._sep}{step}" if step else queue_name) for step in self._steps
        }
        delivery_mode = _delivery_mode(
            (exchange.delivery_mode if exchange is not None else None) or self._app.conf.task_default_delivery_mode
        )
        route = _Route(routing_key=queue_name, keys_by_step=keys, delivery_mode=delivery_mode)
        self._routes[queue_name] = route
        return route


_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
"""A str as the JSON string the encoder writes for it (ensure_ascii, as kombu's encoder)."""
_SLOT = "@chronoq-slot:{}@"


@functools.cache
def _header_slots(count: int) -> tuple[str, ...]:
    return tuple(f"header{i}" for i in range(count))


def _compile(envelope: dict[str, Any], message: TaskMessage) -> str:
    """A ``%``-format string of ``envelope`` (the first message of a shape, decoded) with a
    named slot for each value that differs per message of the shape; the rest is the JSON the
    encoder wrote, byte for byte (the shape fixes which keys exist and their order)."""
    headers, properties = envelope["headers"], envelope["properties"]
    slots: dict[str, str] = {}

    def slot(name: str) -> str:
        slots[name] = _SLOT.format(name)
        return slots[name]

    envelope["body"] = slot("body")
    headers["id"] = headers["root_id"] = properties["correlation_id"] = slot("task_id")
    headers["argsrepr"], headers["kwargsrepr"] = slot("argsrepr"), slot("kwargsrepr")
    for name, header in zip(_header_slots(len(message.headers)), message.headers, strict=True):
        headers[header] = slot(name)
    if message.expires_s is not None:
        headers["expires"], properties["expiration"] = slot("expires"), slot("expiration")
    properties["delivery_tag"] = slot("delivery_tag")
    template = _json_encode(envelope).replace("%", "%%")
    for name, marker in slots.items():
        quoted = _quote(marker)
        if template.count(quoted) != (3 if name == "task_id" else 1):
            raise ValueError(f"task {message.task_id}: cannot build a message template (slot {name})")
        template = template.replace(quoted, f"%({name})s")
    return template


def republish_tag(task_id: str, copy: int) -> str:
    """The delivery tag of the ``copy``-th copy of a fire's message the dispatch audit publishes
    again (``shared/lua/audit.lua`` probes kombu's unacked hash for each).

    A message's delivery tag names it in kombu's ``unacked`` hash, so it has to be unique only
    among messages unacknowledged at once. A fire's message uses its task id (unique per fire:
    uuid5 of job and nominal time); kombu's restore puts the same message back with the same
    tag; a worker's deferred or retried copy gets a fresh one from kombu. A copy published again
    while the first one might still turn up gets ``<task id>.r<copy>``, so the two never share
    an entry."""
    return f"{task_id}.r{copy}"
