"""Celery's ``task-sent`` event for each fire the decide script published.

A task sent with Celery's ``send_task`` (with ``task_send_sent_event``) is announced to the
event stream that Flower, ``celery events`` and exporters follow. chronoq's fires are pushed
onto the broker list by the decide script, so nothing announced them until a worker received
one. This module announces them the way kombu's Redis transport publishes any event: a
``PUBLISH`` on the ``celeryev`` fanout exchange's channel ``/<db>.celeryev/task.sent``
(``fanout_prefix`` and ``fanout_patterns`` are on), carrying kombu's JSON envelope around the
event (body base64-encoded, ``delivery_mode`` 1, ``delivery_info`` naming the exchange and the
routing key ``task.sent``), with the fields ``send_task_message`` gives a task-sent event.

Published from Python right after the decide call returns, for the fires it dispatched, one
pipelined round trip per batch: events are fire-and-forget in Celery too (PUB/SUB, delivered to
whoever listens at that instant), so atomicity with the publish buys nothing, while putting them
in the Lua script would make every decide call carry an event payload per fire whether anybody
enabled events or not. A failed announcement is logged and counted, never retried: the fires
themselves are decided and published.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from loguru import logger

if TYPE_CHECKING:
    from celery import Celery

    from scheduler.fires import Fire
    from scheduler.specs import JobSpec

JOB_CACHE_MAX = 100_000
"""Jobs whose shared event fields are kept (then the cache starts over)."""


class SentEvents:
    """Builds and publishes ``task-sent`` events for dispatched fires."""

    def __init__(self, client: redis.asyncio.Redis, *, db: int, exchange: str = "celeryev", hostname: str = "") -> None:
        self.client = client
        self.exchange = exchange
        self.channel = f"/{db}.{exchange}/task.sent"
        self.hostname = hostname or f"chronoq-scheduler-{os.getpid()}@{os.uname().nodename}"
        self.pid = os.getpid()
        self._clock = itertools.count(1)
        self._jobs: dict[str, tuple[JobSpec, dict[str, Any]]] = {}
        template = json.dumps(
            {
                "body": "\x00",
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"hostname": self.hostname},
                "properties": {
                    "delivery_mode": 1,
                    "delivery_info": {"exchange": self.exchange, "routing_key": "task.sent"},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": "\x01",
                },
            }
        )
        self._head, rest = template.split('"\\u0000"', 1)
        self._head += '"'
        self._middle, self._tail = rest.split('"\\u0001"', 1)
        self._middle, self._tail = '"' + self._middle + '"', '"' + self._tail

    @classmethod
    def for_app(cls, app: Celery, client: redis.asyncio.Redis) -> SentEvents | None:
        """The announcer for ``app``'s configuration; None when ``task_send_sent_event`` is off."""
        if not app.conf.task_send_sent_event:
            return None
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        return cls(client, db=db, exchange=app.conf.event_exchange)

    def event(self, fire: Fire, now_ts: float, offset: int | None = None) -> dict[str, Any]:
        """The event Celery's ``send_task`` would send for the fire's message."""
        job = fire.job
        expires_s = fire.expires_s(datetime.fromtimestamp(now_ts, UTC))
        expires = None if expires_s is None else (datetime.fromtimestamp(now_ts, UTC) + timedelta(seconds=expires_s))
        return {
            "uuid": fire.task_id,
            "root_id": fire.task_id,
            **self._of_job(job),
            "expires": expires.isoformat() if expires else None,
            "utcoffset": utcoffset() if offset is None else offset,
            "clock": next(self._clock),
            "timestamp": now_ts,
        }

    def _of_job(self, job: JobSpec) -> dict[str, Any]:
        """The fields every fire of ``job`` shares (``saferepr`` of its arguments costs ~15 µs)."""
        cached = self._jobs.get(job.id)
        if cached is None or cached[0] is not job:
            if len(self._jobs) > JOB_CACHE_MAX:
                self._jobs.clear()
            fields = {
                "parent_id": None,
                "name": job.task,
                "args": saferepr(tuple(job.args)),
                "kwargs": saferepr(job.kwargs),
                "retries": 0,
                "eta": None,
                "queue": job.queue,
                "exchange": job.queue,
                "routing_key": job.queue,
                "hostname": self.hostname,
                "pid": self.pid,
                "type": "task-sent",
            }
            cached = self._jobs[job.id] = (job, fields)
        return cached[1]

    def envelope(self, event: dict[str, Any]) -> str:
        """kombu's message around ``event``, as its Redis transport PUBLISHes a fanout message
        (the constant part is encoded once; the body is base64 and the tag hex: nothing to escape)."""
        body = base64.b64encode(json.dumps(event).encode()).decode()
        return f"{self._head}{body}{self._middle}{uuid.uuid4()}{self._tail}"

    async def publish(self, fires: Sequence[Fire], now_ts: float) -> int:
        """Announce ``fires`` (dispatched ones) in one round trip; returns how many."""
        if not fires:
            return 0
        offset = utcoffset()
        async with self.client.pipeline(transaction=False) as pipe:
            for fire in fires:
                pipe.publish(self.channel, self.envelope(self.event(fire, now_ts, offset)))
            await pipe.execute()
        return len(fires)


async def announce(events: SentEvents | None, fires: Sequence[Fire], sent_ts: float) -> int:
    """Announce ``fires`` (just dispatched) when events are enabled (``events`` not None), best
    effort: the fires are out, so a Redis error is logged, not raised. Every path that decides
    a fire outside the dispatcher (a manual trigger, a backfill, a sequential backfill's next
    fire) calls this once for what it dispatched; returns how many were announced."""
    if events is None or not fires:
        return 0
    try:
        return await events.publish(fires, sent_ts)
    except (redis.RedisError, OSError) as exc:
        logger.warning("task-sent events for {} fires not published: {}", len(fires), exc)
        return 0
