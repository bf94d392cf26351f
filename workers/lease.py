"""The run lease of a scheduled fire and how each attempt's outcome reaches the fire ledger.

Only messages with a ``job_id`` header (scheduled fires) touch the ledger; ad-hoc tasks are
never looked at. Where each step runs:

- the run lease (:meth:`WorkerFleet.admit`) and the outcome of an attempt that ran its body
  (``task_success``, ``task_failure``, ``task_retry``) run in the process that runs the task;
  a duplicate delivery of a fire that another attempt is running is deferred, not dropped;
- a hard time limit, a lost pool process that is not re-queued, a message rejected without
  requeue and a revoked or expired message are reported by Celery in the worker's main
  process, which names the pool process that ran the attempt (``Request.worker_pid``);
- an outcome counts only if the attempt that reports it still holds the fire's run lease;
- the heartbeat is a thread of the main process, from ``worker_ready`` to ``worker_shutdown``.

A Redis error in a handler is logged and never fails the task or the worker: the fire's slot
then lapses on its own (time limit + ``SCHEDULER_SLOT_MARGIN_S``).
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections import OrderedDict
from functools import partial
from typing import Any, NamedTuple, NoReturn

import redis
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Ignore, Reject, TimeLimitExceeded
from celery.states import SUCCESS
from loguru import logger

from shared.errors import NotReplicatedError
from shared.fleet import FireLedger, Outcome
from shared.names import RedisKeys
from shared.redis import create_redis, retry_through_restart, retry_unconfirmed
from shared.settings import AppSettings
from workers.heartbeat import Heartbeat
from workers.keeper import Held, LeaseKeeper
from workers.requests import ERROR_MAX_CHARS, Headers, fire_of, pid_is_gone, retry_delay_s, short_error

FINISH_RETRY_MIN_S = 3.0
FINISH_RETRY_MAX_S = 60.0


def finish_retry_s(visibility_timeout_s: float) -> float:
    """How long an outcome Redis cannot take (a restart, a failover: a fenced master refuses
    writes until its replica is promoted) is tried again: half the visibility timeout, within
    3-60 s. Given up, the lease lapses and the message, whose ack failed too, runs again once
    the visibility timeout restores it: the retry must outlast a failover (a planned one took
    3.3 s on a loaded machine, past the fixed 3 s this was, and the fire ran twice), and ends
    well before the message can come back."""
    return min(FINISH_RETRY_MAX_S, max(FINISH_RETRY_MIN_S, visibility_timeout_s / 2))


_RECEIVED_MAX = 10_000
_DONE = {
    "": "the fire already succeeded",
    "retired": "its record was retired long ago",
    "lost": "the dispatch audit recorded it lost (its message was nowhere past its expiry)",
}
DEFER_MIN_S = 1.0
"""A deferred duplicate comes back at least this late."""
DEFER_SLACK_S = 0.5
"""... and this long after the holder's lease ends, so it finds it lapsed."""
UNCONFIRMED_RETRY_S = 2.0
"""A run lease start its replicas did not confirm (``REDIS_WAIT_REPLICAS``) is tried again this
long (at most a quarter of the time limit): a failover moves the client to the new master."""
UNCONFIRMED_DEFER_S = 4.5
"""... then the delivery comes back this much later (deferred, not re-queued at once)."""


class Lease(NamedTuple):
    """Who reports an outcome: the ``host:pid`` that took the run lease and the attempt number
    :meth:`FireLedger.start` gave it (0: any attempt of that process; ``runner`` "": a
    message that never started)."""

    runner: str
    attempt: int


NEVER_STARTED = Lease("", 0)


class WorkerFleet:
    """The worker's side of the fleet state, for one worker and its pool processes.

    Redis clients are per process (created lazily after a fork). ``_leased`` holds the run
    leases this process took, by task id and thread, so only the attempt that really ran
    reports its outcome, and names itself when it does.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.slot_margin_s = settings.scheduler.slot_margin_s
        self.finish_retry_s = finish_retry_s(settings.celery.visibility_timeout_s)
        self._clients: dict[int, tuple[redis.Redis, FireLedger]] = {}
        self._leased: dict[tuple[str, int], Lease] = {}
        # Main process: task id -> fire and the requests received with that id (weakly: Celery
        # drops a request once it is done), for the hard time limit whose task_failure carries
        # no request, and for the pool process an attempt ran in. Bounded: most entries are
        # never looked up.
        self._received: OrderedDict[str, tuple[tuple[str, str], list[weakref.ref[Any]]]] = OrderedDict()
        self._tokens: dict[str, str] = {}
        """Task id -> the token of a run lease start that failed (see :meth:`admit`)."""
        self._heartbeat: Heartbeat | None = None
        self._nodename: str | None = None
        self._keeper = LeaseKeeper(lambda: self.ledger, settings.worker.pool)

    # -- per-process clients -------------------------------------------------------------
    def _pair(self) -> tuple[redis.Redis, FireLedger]:
        pair = self._clients.get(os.getpid())
        if pair is None:
            client = create_redis(self.settings.redis)
            limit, strict = self.settings.scheduler.history_limit, self.settings.redis.wait_replicas > 0
            ledger = FireLedger(client, self.keys, history_limit=limit, require_record=strict)
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

        ``done`` (the fire succeeded already) raises ``Ignore``: the message is acked and
        nothing is stored. ``busy`` (another attempt holds a live lease, e.g. on another host
        after the visibility timeout) defers the delivery (:meth:`defer`) until that lease
        ends: then the fire is done, or the other attempt died and this delivery takes over. A
        lease held by a process of this same worker that no longer exists (a killed pool
        process, whose message Celery re-queued at once) is taken over at once. If Redis
        cannot be reached the delivery is re-queued (``Reject``) rather than run without a
        lease.
        """
        fire = fire_of(request)
        if fire is None:
            return
        job_id, scheduled_at = fire
        task_id = str(request.id)
        hostname = self.hostname
        runner = f"{hostname}:{os.getpid()}"
        time_limit_s = self.time_limit_s(task, request)
        lease_ms = int((time_limit_s + self.slot_margin_s) * 1000)
        # A start whose reply was lost, or that its replicas did not confirm, may have taken the
        # lease after all: sent again, here or in a later delivery to this process, with the same
        # token it finds the lease its own instead of busy until it lapses.
        token = self._tokens.pop(task_id, None) or os.urandom(8).hex()
        start = partial(
            self.ledger.start,
            job_id,
            scheduled_at,
            task_id,
            runner,
            lease_ms,
            retries=request.retries or 0,
            token=token,
        )
        try:
            verdict, holder, left_ms, attempt = retry_unconfirmed(start, min(UNCONFIRMED_RETRY_S, time_limit_s / 4))
            if verdict == "busy" and self._holder_is_gone(str(holder), hostname):
                logger.warning("run lease taken over job_id={} holder={} (its process is gone)", job_id, holder)
                verdict, holder, left_ms, attempt = start(force=True)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if len(self._tokens) >= _RECEIVED_MAX:  # deliveries that went elsewhere: forget them
                self._tokens.clear()
            self._tokens[task_id] = token
            if isinstance(exc, NotReplicatedError):
                # The broker answers (a re-queued message would come straight back): try later.
                # shared.durability has reported the missing replicas once.
                why = "its run lease is not confirmed by the replicas yet"
                self.defer(task, request, job_id, "-", UNCONFIRMED_DEFER_S, time_limit_s, why=why)
            logger.error("run lease unavailable, message re-queued job_id={}: {}", job_id, exc)
            raise Reject(exc, requeue=True) from exc
        if verdict == "run":
            key = (task_id, threading.get_ident())
            self._leased[key] = Lease(runner, int(attempt))
            self._keeper.hold(key, Held(job_id, scheduled_at, task_id, runner, int(attempt), lease_ms, time_limit_s))
            return
        if verdict == "done":
            why = _DONE.get(str(holder)) or f"the fire is {holder}, not dispatched (a failover lost its decision)"
            logger.info("duplicate delivery skipped job_id={} holder=- ({})", job_id, why)
            raise Ignore()
        self.defer(task, request, job_id, str(holder), int(left_ms) / 1000, time_limit_s)

    def defer(
        self,
        task: Task,
        request: Any,
        job_id: str,
        holder: str,
        lease_left_s: float,
        time_limit_s: float,
        why: str = "another attempt holds a live lease",
    ) -> NoReturn:
        """Publish this delivery again, due when the holder's lease ends, then ack it (``Ignore``).

        The copy keeps the task id, headers, retry count and limits. A worker holds it unacked
        until it is due, in its consumer, not in a pool process; if that worker dies the broker
        hands it out again after the visibility timeout. A crash between publishing and acking
        leaves one extra copy, which the lease turns away. The countdown is capped at the
        visibility timeout minus time limit and slot margin, so the copy has run before the
        visibility timeout could hand it out once more.

        Not ``Reject(requeue=True)``: the message would go straight back to the queue and an
        idle worker take it at once; spacing the checks would mean sleeping in a pool process,
        which holds a pool slot (and counts against the time limit) while the other attempt
        runs. Not ``self.retry()``: that counts against ``max_retries`` and the task's backoff,
        sends ``task_retry`` and stores RETRY, which can overwrite the running attempt's SUCCESS.
        If publishing fails the delivery is re-queued (``Reject``) instead.
        """
        cap_s = self.settings.celery.visibility_timeout_s - time_limit_s - self.slot_margin_s
        countdown_s = max(DEFER_MIN_S, min(lease_left_s + DEFER_SLACK_S, cap_s))
        try:
            task.signature_from_request(request, countdown=countdown_s).apply_async()
        except Exception as exc:
            logger.error("duplicate delivery not deferred, message re-queued job_id={}: {}", job_id, exc)
            raise Reject(exc, requeue=True) from exc
        logger.info(
            "duplicate delivery deferred job_id={} holder={} countdown_s={:.1f} ({})",
            job_id,
            holder or "-",
            countdown_s,
            why,
        )
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
        fire = fire_of(Headers(getattr(request, "request_dict", None) or {}))
        if request is None or fire is None:
            return
        task_id = str(request.id)
        seen = self._received.pop(task_id, (fire, []))[1]
        self._received[task_id] = (fire, [*(ref for ref in seen if ref() is not None), weakref.ref(request)])
        while len(self._received) > _RECEIVED_MAX:
            self._received.popitem(last=False)

    def on_success(self, sender: Any = None, **_: Any) -> None:
        request = sender.request
        lease = self._take_lease(str(request.id))
        if lease is not None:
            self._finish(fire_of(request), str(request.id), Outcome.SUCCEEDED, lease=lease)

    def on_retry(self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        lease = None if request is None else self._take_lease(str(request.id))
        if lease is None:
            return
        exc = getattr(reason, "exc", None) or reason
        error = short_error(exc) if isinstance(exc, BaseException) else str(exc or "")[:ERROR_MAX_CHARS]
        # The slot stays taken until the retry is due and has had its time limit to run: a long
        # backoff must not free it for an overlapping fire, a worker gone meanwhile not keep it.
        lapse_s = retry_delay_s(getattr(reason, "when", None)) + self.time_limit_s(sender, request) + self.slot_margin_s
        self._finish(
            fire_of(request), str(request.id), Outcome.RETRIED, error, lease=lease, retry_lapse_ms=int(lapse_s * 1000)
        )

    def on_failure(self, sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
        # In the running process the attempt is ours if we leased it. The main process reports
        # a hard time limit, a lost pool process (not re-queued) and a message rejected without
        # requeue, of an attempt that ran in one of its pool processes.
        lease = self._take_lease(task_id)
        if lease is None and not isinstance(exception, TimeLimitExceeded | WorkerLostError | Reject):
            return
        request = getattr(sender, "request", None)
        fire = fire_of(request) if getattr(request, "id", None) == task_id else None
        if lease is None:
            received, lease = self._pool_attempt(task_id)
            fire = fire or received
        error = short_error(exception) if isinstance(exception, BaseException) else "failed"
        self._finish(fire, task_id, Outcome.FAILED, error, lease=lease)

    def on_revoked(self, request: Any = None, terminated: bool = False, expired: bool = False, **_: Any) -> None:
        fire = fire_of(request)
        if request is None or fire is None:
            return
        task_id = str(request.id)
        # Terminated: an attempt ran in a pool process. Otherwise the message never started
        # here (expired or revoked in the queue), and must not overwrite the outcome of another
        # attempt of the same fire that succeeded or is running: the ledger sees to that.
        lease = self._pool_attempt(task_id)[1] if terminated else NEVER_STARTED
        outcome, error = (Outcome.EXPIRED, "expired") if expired else (Outcome.FAILED, "revoked")
        self._finish(fire, task_id, outcome, error, lease=lease)

    def _take_lease(self, task_id: str) -> Lease | None:
        key = (task_id, threading.get_ident())
        self._keeper.drop(key)
        return self._leased.pop(key, None)

    def on_postrun(self, sender: Any = None, task_id: str = "", state: str = "", **_: Any) -> None:
        # The body returned but no task_success came (it comes first): Celery could not store the
        # result (its backend's Redis went away) and reports an internal error next. The body
        # ran: record the success, or the lease would lapse and a redelivered copy run it again.
        if state == SUCCESS and (lease := self._take_lease(task_id)) is not None:
            self._finish(fire_of(getattr(sender, "request", None)), task_id, Outcome.SUCCEEDED, lease=lease)
        # Whatever ended the attempt (an outcome above, or a Reject/Ignore from the body), its
        # lease is no longer kept once the task has returned.
        self._keeper.drop((task_id, threading.get_ident()))

    def on_unknown(self, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
        """Main process: a fire of a task this worker has not registered was dropped. Record it
        failed and free its slot now, instead of the slot lapsing after queue wait, time limit
        and margin (about 31 min by default)."""
        fire = fire_of(Headers(getattr(message, "headers", None) or {}))
        self._finish(fire, str(id), Outcome.FAILED, f"unregistered task {name}"[:ERROR_MAX_CHARS], lease=NEVER_STARTED)

    def _pool_attempt(self, task_id: str) -> tuple[tuple[str, str] | None, Lease]:
        """Main process: the fire of a received message and the lease of the pool process that
        accepted it (any attempt of that process), or :data:`NEVER_STARTED` if none did."""
        fire, requests = self._received.get(task_id, (None, []))
        pids = [pid for ref in requests if (pid := getattr(ref(), "worker_pid", None))]
        return fire, Lease(f"{self.hostname}:{pids[-1]}", 0) if pids else NEVER_STARTED

    def _finish(
        self,
        fire: tuple[str, str] | None,
        task_id: str,
        outcome: Outcome,
        error: str = "",
        *,
        lease: Lease,
        retry_lapse_ms: int = 0,
    ) -> None:
        if fire is None:
            return
        job_id, scheduled_at = fire
        finish = partial(
            self.ledger.finish,
            job_id,
            scheduled_at,
            task_id,
            outcome,
            error,
            worker=self.hostname,
            runner=lease.runner,
            attempt=lease.attempt,
            retry_lapse_ms=retry_lapse_ms,
        )
        try:
            verdict, current = retry_through_restart(finish, self.finish_retry_s)
            if verdict == "applied" and outcome in (Outcome.SUCCEEDED, Outcome.FAILED):
                self.ledger.streak(job_id, scheduled_at, outcome, error, by=self.hostname)
        except redis.RedisError as exc:
            logger.error("fire outcome not recorded job_id={} outcome={}: {}", job_id, outcome.value, exc)
            return
        if verdict != "applied":
            logger.info(
                "stale outcome ignored job_id={} task_id={} outcome={} runner={} (the fire is {})",
                job_id,
                task_id,
                outcome.value,
                lease.runner or "-",
                current,
            )

    @property
    def hostname(self) -> str:
        """This worker's node name: as Celery announced it at start (inherited by pool
        processes), else as ``chronoq worker`` passes it."""
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
        tasks = sorted(
            name for name in getattr(getattr(sender, "app", None), "tasks", {}) if not name.startswith("celery.")
        )
        self._heartbeat = Heartbeat(self.settings, self.keys.workers, hostname, queues, tasks)
        self._heartbeat.start()

    def on_worker_shutdown(self, **_: Any) -> None:
        self._keeper.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        for client, _ledger in self._clients.values():
            client.close()
        self._clients.clear()
