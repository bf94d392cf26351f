"""create_celery_app(): the one place a Celery app is configured, for workers and producers alike.

JSON is the only serializer anywhere (tasks, results, events, remote control): pickle is
refused by every app built here. Messages are acknowledged after the task ends
(``task_acks_late``) and re-queued when a worker process dies mid-task, so nothing is lost with
a worker; the broker's visibility timeout is checked against the task time limit plus
``SCHEDULER_SLOT_MARGIN_S`` at settings load so a long task is never delivered twice (see
``AppSettings``), and a dead worker's messages are handed out again soon after it passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from shared.names import HEADER_JOB_ID
from shared.redis import sentinel_options
from shared.settings import AppSettings

JSON_ONLY = ["json"]


def celery_config(settings: AppSettings, task_modules: Sequence[str] = ()) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (secrets included: never log it)."""
    redis, celery = settings.redis, settings.celery
    transport: dict[str, Any] = {
        "visibility_timeout": celery.visibility_timeout_s,
        "socket_timeout": redis.socket_timeout_s,
        "socket_connect_timeout": redis.socket_connect_timeout_s,
        "retry_on_timeout": True,
        "health_check_interval": redis.health_check_interval_s,
        "fanout_prefix": True,
        "fanout_patterns": True,
        # A message whose worker died is handed out again only when a consumer sweeps the
        # unacked index. kombu's defaults sweep every 10th tick of 10 s (~100 s late); this
        # sweeps on every tick, and ticks every tenth of the visibility timeout (1-10 s), so a
        # dead worker's fire runs again soon after the timeout. Cost per consuming worker and
        # tick: a lock, one ZRANGE BYSCORE on the unacked index and the unlock (three round
        # trips); and a synchronous consumer (drain_events, e.g. `celery inspect`)
        # sweeps on each empty poll instead of every tenth. A kombu without these options (5.7.0
        # has both) ignores them and sweeps at its own pace.
        "unacked_restore_interval": restore_interval_s(celery.visibility_timeout_s),
        "unacked_restore_throttle": 1,
        # The sweep's lock (so the workers take turns) expires after one tick instead of
        # kombu's 300 s: a sweep cut by a Redis restart left it held through the restart (AOF),
        # and no sweep ran for five minutes (issue #23; workers/restore.py).
        "unacked_mutex_expire": restore_interval_s(celery.visibility_timeout_s),
    }
    config: dict[str, Any] = {
        "broker_url": settings.broker_url(),
        "result_backend": settings.result_backend_url(),
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": JSON_ONLY,
        "result_accept_content": JSON_ONLY,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.worker.prefetch_multiplier,
        "task_time_limit": celery.task_time_limit_s,
        "task_soft_time_limit": celery.task_soft_time_limit_s,
        "result_expires": celery.result_expires_s,
        "result_extended": True,
        # STARTED is stored by chronoq's task base class once the run lease admitted the
        # delivery (workers/runtime.py). Celery's own tracking stores it before any task code
        # runs, so a duplicate that the lease turns away would replace the running attempt's
        # STARTED (and, racing its SUCCESS, could replace that too).
        "task_track_started": False,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": redis.socket_connect_timeout_s,
        "redis_socket_timeout": redis.socket_timeout_s,
        "redis_socket_connect_timeout": redis.socket_connect_timeout_s,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": redis.health_check_interval_s,
        # Flower and `celery events` need these.
        "worker_send_task_events": True,
        "task_send_sent_event": celery.task_send_sent_event,
        "task_default_queue": celery.default_queue,
        "task_queues": tuple(_direct_queue(name) for name in (celery.cron_queue, celery.default_queue)),
        "task_routes": (_ScheduledToCronQueue(celery.cron_queue),),
        "enable_utc": True,
        "timezone": "UTC",
        # chronoq's configure_logging() owns logging; Celery must not replace handlers or
        # stdout (a redirected stderr would loop loguru's sink back into logging).
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "imports": tuple(task_modules),
    }
    if redis.uses_tls:
        config["broker_use_ssl"] = redis.ssl_options()
        config["redis_backend_use_ssl"] = redis.ssl_options()
    if redis.uses_sentinel:
        # kombu's and Celery's sentinel:// transport: the URL lists the Sentinels (with the
        # master's password and database); the master's name and the Sentinels' own password
        # and TLS travel here. Both ask the Sentinels again after a failover.
        sentinel = {"master_name": redis.sentinel_master, "sentinel_kwargs": sentinel_options(redis)}
        transport.update(sentinel)
        # A result (or STARTED) stored while the master is down or moving is retried for about
        # 5.5 s (0.1 s doubling to 1 s; a failover takes 2-4 s) instead of failing the task
        # outside its body: that left the fire unrecorded, its lease lapsed, and its message,
        # whose ack was lost too, ran a second time after the visibility timeout. Bounded so a
        # pool process is not held near a short hard time limit.
        config.update(
            result_backend_always_retry=True,
            result_backend_max_retries=8,
            result_backend_base_sleep_between_retries_ms=100,
            result_backend_max_sleep_between_retries_ms=1000,
        )
        if config["result_backend"].startswith("sentinel://"):
            # Celery's Sentinel backend with chronoq's pool (see shared.sentinel.ResultBackend).
            config["result_backend"] = f"shared.sentinel:ResultBackend+{config['result_backend']}"
            config["result_backend_transport_options"] = {
                **sentinel,
                "chronoq_sentinel_check_s": redis.sentinel_check_s,
            }
    return config


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between sweeps for unacknowledged messages older than the visibility timeout:
    a tenth of it, between 1 and 10 s."""
    return max(1, min(10, visibility_timeout_s // 10))


def _direct_queue(name: str) -> Queue:
    # Each queue gets its own direct exchange and routing key, all named like the queue. Left
    # unset, Celery binds every queue to the default queue's exchange and routing key, and a
    # message routed by exchange would land in both lists.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


class _ScheduledToCronQueue:
    """Route a message that carries a ``job_id`` header (a scheduled fire) to the cron queue.

    An explicit ``queue=`` always wins; everything else falls through to
    ``task_default_queue``, the ad-hoc queue.
    """

    def __init__(self, cron_queue: str) -> None:
        self.cron_queue = cron_queue

    def __call__(self, name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **kw: Any) -> Any:
        headers = options.get("headers") or {}
        if HEADER_JOB_ID in headers:
            return {"queue": self.cron_queue}
        return None


def create_celery_app(
    settings: AppSettings,
    *,
    name: str = "chronoq",
    task_modules: Sequence[str] = (),
    task_cls: str | None = None,
    set_as_current: bool = False,
) -> Celery:
    """Build a configured Celery app. Creating it connects to nothing.

    ``task_modules`` are imported by a worker at start; producers need none (they send by task
    name). ``task_cls`` is the dotted ``module:Class`` of the task base class (workers pass the
    one that also runs ``async def`` bodies).
    """
    app = Celery(name, set_as_current=set_as_current, task_cls=task_cls)
    app.conf.update(celery_config(settings, task_modules))
    return app
