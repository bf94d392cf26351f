"""The ad-hoc producer API: what applications use to submit work to the chronoq fleet.

Ad-hoc work goes to the default queue (``celery_queue``) unless told otherwise, so it never
competes with scheduled fires on ``cron_queue``. Every call is blocking; from asyncio code run
them with ``anyio.to_thread.run_sync``.

>>> client = Client(settings)
>>> task_id = client.submit("demo.number_sum", args=[2, 3])
>>> client.result(task_id, timeout=10)
5
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult

from shared.celery_app import create_celery_app
from shared.errors import RedisUnavailableError
from shared.names import HEADER_TRACE_ID, new_trace_id
from shared.redis import check_redis
from shared.settings import AppSettings

RESULT_RECHECK_S = 1.0
"""While :meth:`Client.result` waits, it reads the stored result again this often."""


@dataclass(frozen=True, slots=True)
class BrokerHealth:
    ok: bool
    latency_ms: float | None
    error: str | None = None


class Client:
    """Submit tasks by name, compose them, and read their results.

    ``settings`` must name a Redis (``REDIS_URL``, or the embedded one resolved by
    :func:`shared.redis.resolve_redis`).
    """

    def __init__(self, settings: AppSettings, app: Celery | None = None) -> None:
        self.settings = settings
        self._own_app = app is None
        self.app = app or create_celery_app(settings, name="chronoq-client")
        self._backends: list[Any] = []
        self._backends_lock = threading.Lock()

    def _backend(self) -> Any:
        """The calling thread's result backend (Celery keeps one per thread), remembered so
        that :meth:`close` releases every one this client used."""
        backend = self.app.backend
        with self._backends_lock:
            if not any(seen is backend for seen in self._backends):
                self._backends.append(backend)
        return backend

    def signature(
        self, task_name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A signature for composing with :meth:`chain`, :meth:`group` and :meth:`chord`."""
        options.setdefault("queue", self.settings.celery.default_queue)
        return self.app.signature(task_name, args=tuple(args), kwargs=kwargs or {}, **options)

    def submit(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        task_id: str | None = None,
        trace_id: str | None = None,
    ) -> str:
        """Send one task by name; return its task id.

        ``priority`` 0-9 (0 runs first on Redis). ``countdown`` / ``eta`` delay it; keep the
        delay below ``CELERY_VISIBILITY_TIMEOUT_S`` or the Redis transport redelivers it.
        """
        self._backend()
        result = self.app.send_task(
            task_name,
            args=list(args),
            kwargs=kwargs or {},
            queue=queue or self.settings.celery.default_queue,
            priority=priority,
            countdown=countdown,
            eta=eta,
            task_id=task_id,
            headers={HEADER_TRACE_ID: trace_id or new_trace_id()},
        )
        return str(result.id)

    def chain(self, *signatures: Signature) -> str:
        """Run ``signatures`` one after another, each receiving the previous result; returns
        the id of the last task (its result is the chain's result)."""
        self._backend()
        return str(chain(*signatures).apply_async().id)

    def group(self, *signatures: Signature) -> str:
        """Run ``signatures`` in parallel; returns the group id (:meth:`result` gives the list)."""
        self._backend()
        result = group(*signatures).apply_async()
        result.save()
        return str(result.id)

    def chord(self, header: Sequence[Signature], body: Signature) -> str:
        """Run ``header`` in parallel, then ``body`` with the list of their results; returns the
        body's task id."""
        self._backend()
        return str(chord(list(header), body).apply_async().id)

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait up to ``timeout`` seconds for a task's (or a group's) result.

        Raises the task's own exception if it failed, ``celery.exceptions.TimeoutError`` when
        it is not done in time.

        Celery's Redis backend waits for a result's notification (a PUBLISH) and reads the
        stored result only once, when the wait starts; a notification that never reaches the
        subscription would leave the wait to its timeout with the result long stored. The wait
        here reads the stored result again every :data:`RESULT_RECHECK_S` seconds.
        """
        self._backend()
        saved = GroupResult.restore(task_id, app=self.app)
        pending: GroupResult | AsyncResult = saved if saved is not None else AsyncResult(task_id, app=self.app)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return pending.get(timeout=RESULT_RECHECK_S if left is None else min(RESULT_RECHECK_S, left))
            except CeleryTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def status(self, task_id: str) -> str:
        """PENDING (unknown or queued), STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        self._backend()
        return str(AsyncResult(task_id, app=self.app).state)

    def revoke(self, task_id: str, *, terminate: bool = False) -> None:
        """Tell every worker not to run ``task_id``; with ``terminate`` also kill it if running."""
        self.app.control.revoke(task_id, terminate=terminate, signal="SIGTERM")

    def health(self) -> BrokerHealth:
        """Whether the broker answers, and how fast."""
        try:
            latency = check_redis(self.settings.redis, self.settings.broker_url())
        except RedisUnavailableError as exc:
            return BrokerHealth(ok=False, latency_ms=None, error=str(exc))
        return BrokerHealth(ok=True, latency_ms=round(latency, 2))

    def close(self) -> None:
        """Release the broker and backend connections.

        The result backends' connections of an app this client created are closed here rather
        than left to the garbage collector: Celery unsubscribes a result when the result object
        is collected (``AsyncResult.__del__``), and when the collector had finalized the
        subscription's connection first, that opened a new connection that nobody closed (a
        ``ResourceWarning`` for an unclosed socket, at some later collection). Here the
        subscriptions are forgotten before they are closed, so a result collected later has
        nothing to unsubscribe."""
        with self._backends_lock:
            backends, self._backends = self._backends, []
        for backend in backends if self._own_app else ():  # an app passed in is its owner's to close
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None and hasattr(consumer, "subscribed_to"):
                consumer.subscribed_to.clear()
                consumer.stop()
            redis_client = vars(backend).get("client")  # only if it was created (a cached property)
            if redis_client is not None:
                redis_client.connection_pool.disconnect()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
