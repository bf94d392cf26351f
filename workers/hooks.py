"""Worker signal handlers: logging in every process, log context per task, the fire ledger
(run lease and outcome of every scheduled fire), the worker heartbeat, clean shutdown.

Only messages with a ``job_id`` header (scheduled fires) touch the ledger; ad-hoc tasks are
never looked at. Where each step runs:

- the run lease (:meth:`WorkerFleet.admit`) and the outcome of an attempt that ran its body
  (``task_success``, ``task_failure``, ``task_retry``) run in the process that runs the task;
- a hard time limit, a lost pool process that is not re-queued and a revoked or expired
  message are reported by Celery in the worker's main process;
- the heartbeat is a thread of the main process, from ``worker_ready`` to ``worker_shutdown``.

A Redis error in a handler is logged and never fails the task or the worker: the fire's slot
then lapses on its own (time limit + ``SCHEDULER_SLOT_MARGIN_S``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

import psutil
import redis
from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.exceptions import Ignore, Reject, TimeLimitExceeded
from loguru import logger

from shared.fleet import FireLedger, Outcome
from shared.logging import bind_context, configure_logging, reset_context
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID, RedisKeys
from shared.redis import create_redis
from shared.settings import AppSettings
from workers.runtime import ChronoqTask, runtime

HEARTBEAT_INTERVAL_S = 2.0
ERROR_MAX_CHARS = 300
_RECEIVED_MAX = 10_000

_tokens: dict[str, Any] = {}
_fleet: WorkerFleet | None = None


def install_worker_hooks(settings: AppSettings) -> None:
    """Connect the handlers and make :func:`worker_fleet` answer (once per process;
    connecting twice is harmless)."""
    global _fleet
    fleet = WorkerFleet(settings)
    _fleet = fleet
    ChronoqTask.run_guard = fleet

    def on_setup_logging(**_: Any) -> None:
        # Connecting here at all stops Celery from configuring logging itself.
        configure_logging(settings, process="worker")

    def on_process_init(**_: Any) -> None:
        configure_logging(settings, process="worker")

    connections: list[tuple[Any, Any, str]] = [
        (signals.setup_logging, on_setup_logging, "setup_logging"),
        (signals.worker_process_init, on_process_init, "process_init"),
        (signals.task_prerun, _bind_task_context, "prerun"),
        (signals.task_postrun, _unbind_task_context, "postrun"),
        (signals.worker_process_shutdown, _shutdown_runtime, "process_shutdown"),
        (signals.worker_shutdown, _shutdown_runtime, "shutdown"),
        (signals.worker_ready, _announce_ready, "ready"),
        (signals.celeryd_init, fleet.on_celeryd_init, "fleet.init"),
        (signals.task_received, fleet.on_received, "fleet.received"),
        (signals.task_success, fleet.on_success, "fleet.success"),
        (signals.task_failure, fleet.on_failure, "fleet.failure"),
        (signals.task_retry, fleet.on_retry, "fleet.retry"),
        (signals.task_revoked, fleet.on_revoked, "fleet.revoked"),
        (signals.worker_ready, fleet.on_worker_ready, "fleet.ready"),
        (signals.worker_shutdown, fleet.on_worker_shutdown, "fleet.shutdown"),
    ]
    for signal, handler, uid in connections:
        signal.connect(handler, weak=False, dispatch_uid=f"chronoq.{uid}")


def worker_fleet() -> WorkerFleet:
    """This worker's :class:`WorkerFleet` (its settings, Redis client and key layout), for tasks
    that need them. Raises ``RuntimeError`` outside a worker started by :func:`workers.main`."""
    if _fleet is None:
        raise RuntimeError("no worker fleet: install_worker_hooks(settings) was not called in this process")
    return _fleet


def header(request: Any, name: str) -> str | None:
    """A custom message header of a task request (protocol 2 puts them on the request)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return None if value is None else str(value)


def fire_of(request: Any) -> tuple[str, str] | None:
    """(job_id, scheduled_at) of a scheduled fire's request; None for ad-hoc work."""
    job_id, scheduled_at = header(request, HEADER_JOB_ID), header(request, HEADER_SCHEDULED_AT)
    return None if job_id is None or scheduled_at is None else (job_id, scheduled_at)


def short_error(exc: BaseException) -> str:
    """``Type: message``, cut to :data:`ERROR_MAX_CHARS`."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS]


def pid_is_gone(pid: int) -> bool:
    """True if no process ``pid`` runs on this host (a zombie counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # it exists but we may not look at it


class WorkerFleet:
    """The worker's side of the fleet state, for one worker and its pool processes.

    Redis clients are per process (created lazily after a fork). ``_leased`` holds the task ids
    whose run lease this process took, so only an attempt that really ran reports an outcome.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.slot_margin_s = settings.scheduler.slot_margin_s
        self._clients: dict[int, tuple[redis.Redis, FireLedger]] = {}
        self._leased: set[str] = set()
        # Main process: task id -> fire of received messages, for the hard time limit whose
        # task_failure carries no request. Bounded: most entries are never looked up.
        self._received: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._heartbeat: _Heartbeat | None = None
        self._nodename: str | None = None

    # -- per-process clients -------------------------------------------------------------
    def _pair(self) -> tuple[redis.Redis, FireLedger]:
        pair = self._clients.get(os.getpid())
        if pair is None:
            client = create_redis(self.settings.redis)
            ledger = FireLedger(client, self.keys, history_limit=self.settings.scheduler.history_limit)
            pair = self._clients.setdefault(os.getpid(), (client, ledger))
        return pair

    @property
    def client(self) -> redis.Redis:
        """A blocking Redis client of this process (decoded responses)."""
        return self._pair()[0]

    @property
    def ledger(self) -> FireLedger:
        return self._pair()[1]

    # -- the run lease -------------------------------------------------------------------
    def admit(self, task: Task, request: Any) -> None:
        """Take the run lease of a scheduled fire, or keep this delivery from running.

        ``done`` (the fire succeeded already) and ``busy`` (another attempt holds a live lease)
        raise ``Ignore``: the message is acked and nothing is stored. A lease held by a process
        of this same worker that no longer exists (a killed pool process, whose message Celery
        re-queued at once) is taken over. If Redis cannot be reached the delivery is re-queued
        (``Reject``) rather than run without a lease.
        """
        fire = fire_of(request)
        if fire is None:
            return
        job_id, scheduled_at = fire
        task_id = str(request.id)
        hostname = self.hostname
        runner = f"{hostname}:{os.getpid()}"
        lease_ms = int((self.time_limit_s(task, request) + self.slot_margin_s) * 1000)
        try:
            verdict, holder = self.ledger.start(job_id, scheduled_at, task_id, runner, lease_ms)
            if verdict == "busy" and self._holder_is_gone(str(holder), hostname):
                logger.warning("run lease taken over job_id={} holder={} (its process is gone)", job_id, holder)
                verdict, holder = self.ledger.start(job_id, scheduled_at, task_id, runner, lease_ms, force=True)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.error("run lease unavailable, message re-queued job_id={}: {}", job_id, exc)
            raise Reject(exc, requeue=True) from exc
        if verdict == "run":
            self._leased.add(task_id)
            return
        why = "the fire already succeeded" if verdict == "done" else "another attempt holds a live lease"
        logger.info("duplicate delivery skipped job_id={} holder={} ({})", job_id, holder or "-", why)
        raise Ignore()

    def time_limit_s(self, task: Task, request: Any) -> float:
        """The hard time limit of this delivery: the message's, else the task's, else the app's."""
        limits = getattr(request, "timelimit", None)
        hard = (limits[0] if limits else None) or task.time_limit or task.app.conf.task_time_limit
        return float(hard or self.settings.celery.task_time_limit_s or 0)

    @staticmethod
    def _holder_is_gone(holder: str, hostname: str) -> bool:
        host, _, pid = holder.rpartition(":")
        # Only a pid of this worker means anything here; one on another host may be alive.
        return host == hostname and pid.isdigit() and int(pid) != os.getpid() and pid_is_gone(int(pid))

    # -- outcomes ------------------------------------------------------------------------
    def on_received(self, request: Any = None, **_: Any) -> None:
        fire = fire_of(_Headers(getattr(request, "request_dict", None) or {}))
        if request is None or fire is None:
            return
        self._received[str(request.id)] = fire
        while len(self._received) > _RECEIVED_MAX:
            self._received.popitem(last=False)

    def on_success(self, sender: Any = None, **_: Any) -> None:
        request = sender.request
        if self._leased_here(str(request.id)):
            self._finish(fire_of(request), str(request.id), Outcome.SUCCEEDED)

    def on_retry(self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        if request is None or not self._leased_here(str(request.id)):
            return
        exc = getattr(reason, "exc", None) or reason
        error = short_error(exc) if isinstance(exc, BaseException) else str(exc or "")[:ERROR_MAX_CHARS]
        self._finish(fire_of(request), str(request.id), Outcome.RETRIED, error)

    def on_failure(self, sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
        # In the running process the attempt is ours if we leased it; the main process reports
        # a hard time limit and a lost pool process (not re-queued) of an attempt that ran.
        ran_here = self._leased_here(task_id)
        if not ran_here and not isinstance(exception, TimeLimitExceeded | WorkerLostError):
            return
        request = getattr(sender, "request", None)
        fire = fire_of(request) if getattr(request, "id", None) == task_id else None
        fire = fire or self._received.pop(task_id, None)
        error = short_error(exception) if isinstance(exception, BaseException) else "failed"
        self._finish(fire, task_id, Outcome.FAILED, error)

    def on_revoked(self, request: Any = None, terminated: bool = False, expired: bool = False, **_: Any) -> None:
        fire = fire_of(request)
        if request is None or fire is None:
            return
        task_id = str(request.id)
        self._received.pop(task_id, None)
        if not terminated and self._fire_is_settled(*fire):
            # A message that never ran here (expired or revoked in the queue) must not overwrite
            # the outcome of another attempt of the same fire that succeeded or is running.
            logger.info("revoked duplicate not recorded job_id={} task_id={}", fire[0], task_id)
            return
        outcome, error = (Outcome.EXPIRED, "expired") if expired else (Outcome.FAILED, "revoked")
        self._finish(fire, task_id, outcome, error)

    def _leased_here(self, task_id: str) -> bool:
        if task_id in self._leased:
            self._leased.discard(task_id)
            return True
        return False

    def _fire_is_settled(self, job_id: str, scheduled_at: str) -> bool:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(self.keys.fire(job_id, scheduled_at), ["run", "run_lease_ms"])
                pipe.time()
                (run, lease), (now_s, now_us) = pipe.execute()
        except redis.RedisError as exc:
            logger.error("fire state unreadable job_id={}: {}", job_id, exc)
            return False
        now_ms = now_s * 1000 + now_us // 1000
        return bool(run == "succeeded" or (run == "running" and int(lease or 0) > now_ms))

    def _finish(self, fire: tuple[str, str] | None, task_id: str, outcome: Outcome, error: str = "") -> None:
        if fire is None:
            return
        job_id, scheduled_at = fire
        worker = self.hostname
        try:
            self.ledger.finish(job_id, scheduled_at, task_id, outcome, error, worker=worker)
        except redis.RedisError as exc:
            logger.error("fire outcome not recorded job_id={} outcome={}: {}", job_id, outcome.value, exc)

    @property
    def hostname(self) -> str:
        """This worker's node name: as Celery announced it at start (inherited by pool
        processes), else as ``run_worker.py`` passes it."""
        return self._nodename or self.settings.worker.hostname or f"chronoq@{socket.gethostname()}"

    def on_celeryd_init(self, sender: Any = None, **_: Any) -> None:
        if sender:
            self._nodename = str(sender)

    # -- heartbeat -----------------------------------------------------------------------
    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if self._heartbeat is not None:
            return  # a consumer restart (broker reconnect) announces ready again
        hostname = str(getattr(sender, "hostname", None) or self.hostname)
        try:
            queues = sorted(sender.app.amqp.queues.consume_from)
        except AttributeError:
            queues = []
        self._heartbeat = _Heartbeat(self, hostname, queues)
        self._heartbeat.start()

    def on_worker_shutdown(self, **_: Any) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        for client, _ledger in self._clients.values():
            client.close()
        self._clients.clear()


class _Headers:
    """A message's header dict seen as a request (attributes), for :func:`fire_of`."""

    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers


class _Heartbeat:
    """``HSET workers hostname {last_seen_ms, pid, queues}`` every few seconds from a daemon
    thread of the worker's main process (never on Celery's event loop); ``HDEL`` at stop."""

    def __init__(self, fleet: WorkerFleet, hostname: str, queues: list[str]) -> None:
        self.hostname = hostname
        self.queues = queues
        self.key = fleet.keys.workers
        self.client = create_redis(fleet.settings.redis)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chronoq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HEARTBEAT_INTERVAL_S + 1)
        try:
            self.client.hdel(self.key, self.hostname)
        except redis.RedisError as exc:
            logger.error("worker heartbeat not removed hostname={}: {}", self.hostname, exc)
        self.client.close()

    def _run(self) -> None:
        failing = False
        while True:
            beat = {"last_seen_ms": int(time.time() * 1000), "pid": os.getpid(), "queues": self.queues}
            try:
                self.client.hset(self.key, self.hostname, json.dumps(beat))
                failing = False
            except redis.RedisError as exc:
                if not failing:  # one line per outage, not one per beat
                    logger.error("worker heartbeat failed hostname={}: {}", self.hostname, exc)
                failing = True
            if self._stop.wait(HEARTBEAT_INTERVAL_S):
                return


def _bind_task_context(task_id: str, task: Any, **_: Any) -> None:
    request = task.request
    _tokens[task_id] = bind_context(
        task_id=task_id,
        job_id=header(request, HEADER_JOB_ID),
        scheduled_at=header(request, HEADER_SCHEDULED_AT),
        trace_id=header(request, HEADER_TRACE_ID) or task_id,
    )


def _unbind_task_context(task_id: str, **_: Any) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        reset_context(token)


def _shutdown_runtime(**_: Any) -> None:
    runtime.shutdown()


def _announce_ready(sender: Any = None, **_: Any) -> None:
    logger.info("worker ready hostname={}", getattr(sender, "hostname", "?"))
