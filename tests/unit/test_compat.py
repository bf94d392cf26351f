"""The compatibility fence: every private name (or undocumented attribute, or signature) of a
third-party library that chronoq's product code overrides, calls, reads or assigns, checked
against the installed version.

chronoq subclasses kombu's Redis transport, Celery's consumer, redis-py's clients and
pipelines and APScheduler's scheduler, and calls their internals. A release may rename or
re-sign any of them without notice; the product then breaks at run time, often only under a
fault (a Redis restart, a failover). Each entry of :data:`NAMES` is one such name: the test of
an entry imports it, checks that it exists and that its parameters (names, in order) are the
ones chronoq's override or call was written against, and fails naming the library, its
installed version, the name and the difference.

:func:`test_every_private_use_is_fenced` keeps the table complete: it scans the product code
(``ast``) for private attribute names (``x._name``, ``getattr(x, "_name")``,
``from lib import _name``) that the module itself does not define, for ``self._name`` in a
subclass of a third-party class where that class's source uses the name, and for every method or
class attribute a subclass of a third-party class defines over one of its base's; each must have
an entry for that file. :func:`test_no_stale_entries` fails on an entry whose name its file no
longer mentions. See docs/development.md for what to do when one fails.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("shared", "scheduler", "workers")
ENTRY_POINTS = ("run_scheduler.py", "run_worker.py")
NOT_IMPORTED = {"workers.app"}  # creates a Celery app at import (for `celery -A workers.app`)

METHOD, FUNCTION, ATTRIBUTE, INSTANCE = "method", "function", "attribute", "instance attribute"
OPTION = "transport option"


@dataclass(frozen=True)
class Name:
    """One third-party name chronoq depends on."""

    library: str
    """The distribution, for its version in a failure."""
    path: str
    """``module:Owner.name`` (or ``module:name``)."""
    kind: str
    """METHOD or FUNCTION (signature checked), ATTRIBUTE (exists on the owner: a class or module
    attribute, a property, a slot) or INSTANCE (set on instances: ``self.name`` in the owner's
    source or a class's it inherits from) or OPTION (a kombu channel attribute set from the
    transport options: in the owner's ``from_transport_options``)."""
    used_in: str
    """``file.py:where`` in chronoq."""
    params: tuple[str, ...] | None = None
    """The parameters chronoq depends on, in order (``*args``/``**kwargs`` spelled so); None:
    only existence (chronoq passes everything through)."""
    exact: bool = True
    """All parameters (an override: the library calls it with its own arguments); False: the
    leading ones (a call from chronoq)."""
    keywords: tuple[str, ...] = ()
    """Passed by name: must be named parameters (a ``**kwargs`` would swallow a renamed one)."""
    signature_of: str | None = None
    """``module:Owner.name`` whose parameters to check instead, when ``path`` passes its
    arguments on (``*args, **kwargs``) to it."""

    @property
    def attr(self) -> str:
        return self.path.partition(":")[2].rpartition(".")[2]

    @property
    def file(self) -> str:
        return self.used_in.partition(":")[0]


def override(library: str, path: str, used_in: str, params: tuple[str, ...] | None) -> Name:
    """A method chronoq defines over the library's (the library calls it with its arguments)."""
    return Name(library, path, METHOD, used_in, params)


def call(
    library: str,
    path: str,
    used_in: str,
    params: tuple[str, ...] = (),
    keywords: tuple[str, ...] = (),
    signature_of: str | None = None,
) -> Name:
    """A method or function chronoq calls: ``params`` positionally, ``keywords`` by name."""
    kind = METHOD if "." in path.partition(":")[2] else FUNCTION
    return Name(library, path, kind, used_in, params, exact=False, keywords=keywords, signature_of=signature_of)


def attr(library: str, path: str, used_in: str) -> Name:
    return Name(library, path, ATTRIBUTE, used_in)


def inst(library: str, path: str, used_in: str) -> Name:
    return Name(library, path, INSTANCE, used_in)


def option(library: str, path: str, used_in: str) -> Name:
    return Name(library, path, OPTION, used_in)


RC, RAC = "redis.client:", "redis.asyncio.client:"
RS, RAS = "redis.sentinel:", "redis.asyncio.sentinel:"
KR, KV = "kombu.transport.redis:", "kombu.transport.virtual.base:"
DUR, SEN, TRA = "shared/durability.py", "shared/sentinel.py", "workers/transport.py"
LOOK = "scheduler/lookahead.py"
PIPE = ("self", "connection", "commands", "raise_on_error")

NAMES: tuple[Name, ...] = (
    # -- redis-py: writes that wait for replicas (WAIT in the same round trip) ---------------
    override("redis", RC + "Redis._send_command_parse_response", f"{DUR}:WaitingRedis",
             ("self", "conn", "command_name", "*args", "**options")),
    override("redis", RC + "Redis.pipeline", f"{DUR}:WaitingRedis", ("self", "transaction", "shard_hint")),
    call("redis", RC + "Redis.parse_response", f"{DUR}:WaitingRedis", ("self", "connection", "command_name")),
    call("redis", RC + "Pipeline.__init__", f"{DUR}:WaitingRedis.pipeline",
         ("self", "connection_pool", "response_callbacks", "transaction", "shard_hint")),
    override("redis", RC + "Pipeline._execute_pipeline", f"{DUR}:WaitingPipeline", PIPE),
    override("redis", RC + "Pipeline._execute_transaction", f"{DUR}:WaitingPipeline", PIPE),
    call("redis", RC + "Pipeline.raise_first_error", f"{DUR}:WaitingPipeline", ("self", "commands", "response")),
    override("redis", RAC + "Redis._send_command_parse_response", f"{DUR}:AsyncWaitingRedis",
             ("self", "conn", "command_name", "*args", "**options")),
    override("redis", RAC + "Redis.pipeline", f"{DUR}:AsyncWaitingRedis", ("self", "transaction", "shard_hint")),
    call("redis", RAC + "Redis.parse_response", f"{DUR}:AsyncWaitingRedis", ("self", "connection", "command_name")),
    call("redis", RAC + "Pipeline.__init__", f"{DUR}:AsyncWaitingRedis.pipeline",
         ("self", "connection_pool", "response_callbacks", "transaction", "shard_hint")),
    override("redis", RAC + "Pipeline._execute_pipeline", f"{DUR}:AsyncWaitingPipeline", PIPE),
    override("redis", RAC + "Pipeline._execute_transaction", f"{DUR}:AsyncWaitingPipeline", PIPE),
    call("redis", RAC + "Pipeline.raise_first_error", f"{DUR}:AsyncWaitingPipeline", ("self", "commands", "response")),
    call("redis", "redis.connection:Connection.pack_commands", f"{DUR}:WaitingRedis", ("self", "commands")),
    call("redis", "redis.connection:Connection.send_packed_command", f"{DUR}:WaitingRedis", ("self", "command")),
    call("redis", "redis.asyncio.connection:Connection.pack_commands", f"{DUR}:AsyncWaitingRedis", ("self", "commands")),
    call("redis", "redis.asyncio.connection:Connection.send_packed_command", f"{DUR}:AsyncWaitingRedis",
         ("self", "command")),
    inst("redis", RS + "SentinelManagedConnection.connection_pool", f"{DUR}:_sentinels"),
    inst("redis", RS + "SentinelConnectionPool.sentinel_manager", f"{DUR}:_sentinels"),
    inst("redis", RS + "SentinelConnectionPool.service_name", f"{DUR}:_sentinels"),
    inst("redis", RS + "Sentinel.sentinels", f"{DUR}:_sentinels"),
    # -- redis-py: Sentinel pools that follow the master, fenced connections ------------------
    override("redis", RS + "SentinelManagedConnection.read_response", f"{SEN}:FencedConnection", None),
    override("redis", RAS + "SentinelManagedConnection.read_response", f"{SEN}:AsyncFencedConnection", None),
    override("redis", RS + "SentinelConnectionPool.__init__", f"{SEN}:FollowingPool",
             ("self", "service_name", "sentinel_manager", "**kwargs")),
    override("redis", RS + "SentinelConnectionPool.get_connection", f"{SEN}:FollowingPool", None),
    inst("redis", RS + "SentinelConnectionPool.proxy", f"{SEN}:FollowingPool.get_connection"),
    inst("redis", RS + "SentinelConnectionPoolProxy.master_address", f"{SEN}:FollowingPool.get_connection"),
    call("redis", RS + "SentinelConnectionPoolProxy.get_master_address", f"{SEN}:FollowingPool.get_connection",
         ("self",)),
    override("redis", RAS + "SentinelConnectionPool.__init__", f"{SEN}:AsyncFollowingPool",
             ("self", "service_name", "sentinel_manager", "**kwargs")),
    override("redis", RAS + "SentinelConnectionPool.get_connection", f"{SEN}:AsyncFollowingPool", None),
    inst("redis", RAS + "SentinelConnectionPool.master_address", f"{SEN}:AsyncFollowingPool.get_connection"),
    call("redis", RAS + "SentinelConnectionPool.get_master_address", f"{SEN}:AsyncFollowingPool.get_connection",
         ("self",)),
    call("redis", RS + "Sentinel.discover_master", f"{SEN}:master_moved", ("self", "service_name")),
    call("redis", RS + "Sentinel.master_for", f"{SEN}:sync_master", ("self", "service_name"),
         ("redis_class", "connection_pool_class")),
    call("redis", RAS + "Sentinel.master_for", f"{SEN}:async_master", ("self", "service_name"),
         ("redis_class", "connection_pool_class")),
    # -- Celery: the Sentinel result backend that follows the master ---------------------------
    override("celery", "celery.backends.redis:SentinelBackend._get_pool", f"{SEN}:ResultBackend", ("self", "**params")),
    call("celery", "celery.backends.redis:SentinelBackend._get_sentinel_instance", f"{SEN}:ResultBackend._get_pool",
         ("self", "**params")),
    call("celery", "celery.backends.redis:RedisBackend._get_client", f"{SEN}:ResultBackend._get_pool", ("self",)),
    inst("celery", "celery.backends.redis:RedisBackend._transport_options", f"{SEN}:ResultBackend._get_pool"),
    # -- kombu: the worker's transport (take script, reconnect race, Sentinel, poison) --------
    override("kombu", KR + "QoS.__init__", f"{TRA}:QoS", None),
    override("kombu", KR + "QoS.append", f"{TRA}:QoS.append", ("self", "message", "delivery_tag")),
    call("kombu", KV + "QoS.append", f"{TRA}:QoS.append", ("self", "message", "delivery_tag")),
    override("kombu", KR + "QoS._remove_from_indices", f"{TRA}:QoS, Channel._deliver_taken",
             ("self", "delivery_tag", "pipe")),
    attr("kombu", KR + "QoS.unacked_key", f"{TRA}:QoS._remove_from_indices"),
    attr("kombu", KR + "QoS.unacked_index_key", f"{TRA}:QoS._remove_from_indices"),
    attr("kombu", KR + "Channel.QoS", f"{TRA}:Channel"),
    attr("kombu", KR + "Channel.from_transport_options", f"{TRA}:Channel"),
    override("kombu", KR + "Channel.__init__", f"{TRA}:Channel.__init__", ("self", "*args", "**kwargs")),
    call("kombu", KV + "Channel.__init__", f"{TRA}:Channel.__init__", ("self", "connection")),
    inst("kombu", KV + "Transport.client", f"{TRA}:Channel.__init__, Channel._attached"),
    attr("kombu", KR + "Channel.unacked_key", f"{TRA}:Channel.__init__"),
    attr("kombu", KR + "Channel.unacked_index_key", f"{TRA}:Channel.__init__"),
    attr("kombu", KR + "Channel.global_keyprefix", f"{TRA}:Channel.__init__"),
    override("kombu", KR + "Channel._connparams", f"{TRA}:Channel._connparams", ("self", "asynchronous")),
    override("kombu", KR + "Channel._brpop_start", f"{TRA}:Channel._brpop_start", ("self", "timeout")),
    override("kombu", KR + "Channel._brpop_read", f"{TRA}:Channel._brpop_read", ("self", "**options")),
    override("kombu", KR + "Channel._get", f"{TRA}:Channel._get", ("self", "queue")),
    override("kombu", KR + "Channel.basic_consume", f"{TRA}:Channel.basic_consume", ("self", "queue", "*args", "**kwargs")),
    call("kombu", KV + "Channel.basic_consume", f"{TRA}:Channel.basic_consume", ("self", "queue", "no_ack")),
    inst("kombu", KR + "Channel._queue_cycle", f"{TRA}:Channel._brpop_start, Channel._brpop_read"),
    call("kombu", "kombu.utils.scheduling:round_robin_cycle.consume", f"{TRA}:Channel._brpop_start", ("self", "n")),
    call("kombu", "kombu.utils.scheduling:round_robin_cycle.rotate", f"{TRA}:Channel._brpop_read",
         ("self", "last_used")),
    call("kombu", KR + "Channel._q_for_pri", f"{TRA}:Channel._brpop_start, Channel._get", ("self", "queue", "pri")),
    attr("kombu", KR + "Channel.priority_steps", f"{TRA}:Channel._brpop_start"),
    inst("kombu", KR + "Channel.brpop_timeout", f"{TRA}:Channel._brpop_start"),
    attr("kombu", KR + "Channel._in_poll", f"{TRA}:Channel._brpop_start, Channel._brpop_read"),
    attr("kombu", KR + "Channel._brpop_sent_at", f"{TRA}:Channel._brpop_start"),
    call("kombu", KR + "Channel._flush_brpop_reauth", f"{TRA}:Channel._brpop_read", ("self",)),
    attr("kombu", KR + "Channel.sep", f"{TRA}:Channel._brpop_read"),
    call("kombu", KV + "Transport._deliver", f"{TRA}:Channel._deliver_taken", ("self", "message", "queue")),
    call("kombu", KR + "Channel._maybe_update_queues_expire", f"{TRA}:Channel._get", ("self", "client", "queue")),
    call("kombu", KR + "Channel._create_client", f"{TRA}:Channel._poison_client", ("self",)),
    override("kombu", KR + "SentinelChannel._sentinel_managed_pool", f"{TRA}:SentinelChannel",
             ("self", "asynchronous")),
    attr("kombu", KR + "SentinelChannel.from_transport_options", f"{TRA}:SentinelChannel"),
    inst("kombu", KR + "SentinelChannel._sentinel_manager", f"{TRA}:SentinelChannel._master_pool"),
    inst("kombu", KR + "SentinelChannel._async_sentinel_manager", f"{TRA}:SentinelChannel._master_pool"),
    option("kombu", KR + "SentinelChannel.master_name", f"{TRA}:SentinelChannel._master_pool"),
    option("kombu", KR + "SentinelChannel.min_other_sentinels", f"{TRA}:SentinelChannel._master_pool"),
    option("kombu", KR + "SentinelChannel.sentinel_kwargs", f"{TRA}:SentinelChannel._master_pool"),
    attr("kombu", KR + "Transport.Channel", f"{TRA}:Transport"),
    # The restore sweep under a lock that a Redis restart cannot leave held (workers/restore.py).
    override("kombu", KR + "QoS.restore_visible", f"{TRA}:QoS.restore_visible", ("self", "start", "num", "interval")),
    inst("kombu", KR + "QoS._vrestore_count", f"{TRA}:QoS.restore_visible"),
    call("kombu", KR + "QoS.restore_by_tag", f"{TRA}:QoS.restore_visible", ("self", "tag", "client")),
    attr("kombu", KR + "QoS.unacked_mutex_key", f"{TRA}:QoS.restore_visible"),
    attr("kombu", KR + "QoS.unacked_mutex_expire", f"{TRA}:QoS.restore_visible"),
    option("kombu", KR + "Channel.unacked_mutex_expire", "shared/celery_app.py:celery_config"),
    call("redis", "redis.lock:Lock.do_release", "workers/restore.py:SweepLock", ("self", "expected_token")),
    override("celery", "celery.worker.consumer.gossip:Gossip._close", "workers/consumer.py:Gossip._close",
             ("self", "c", "cancel_consumers")),
    attr("celery", "celery.worker.consumer.consumer:Consumer.Blueprint.default_steps", "workers/consumer.py:Consumer.Blueprint"),
    attr("kombu", KR + "SentinelTransport.Channel", f"{TRA}:SentinelTransport"),
    attr("kombu", KR + "SentinelChannel.connection_class", f"{TRA}:SentinelChannel"),
    attr("kombu", KR + "SentinelChannel.connection_class_ssl", f"{TRA}:SentinelChannel"),
    # -- Celery and kombu: the worker's consumer, task base class, timer bootstep --------------
    override("celery", "celery.worker.consumer.consumer:Consumer.ensure_connected", "workers/consumer.py:Consumer",
             ("self", "conn")),
    call("kombu", "kombu.connection:Connection.ensure_connection", "workers/consumer.py:Consumer.ensure_connected",
         ("self",), ("interval_start", "interval_step", "interval_max"),
         signature_of="kombu.connection:Connection._ensure_connection"),
    override("celery", "celery.worker.consumer.consumer:Consumer.on_decode_error", "workers/consumer.py:Consumer",
             ("self", "message", "exc")),
    override("celery", "celery.worker.consumer.consumer:Consumer.on_invalid_task", "workers/consumer.py:Consumer",
             ("self", "body", "message", "exc")),
    override("celery", "celery.worker.consumer.consumer:Consumer.on_unknown_message", "workers/consumer.py:Consumer",
             ("self", "body", "message")),
    override("celery", "celery.worker.consumer.consumer:Consumer.on_unknown_task", "workers/consumer.py:Consumer",
             ("self", "body", "message", "exc")),
    inst("kombu", KV + "Message._raw", "workers/consumer.py:Consumer._set_aside"),
    call("kombu", KR + "Channel._create_client", "workers/consumer.py:Consumer._set_aside", ("self",)),
    override("celery", "celery.app.task:Task.__call__", "workers/runtime.py:ChronoqTask", None),
    attr("celery", "celery.app.task:Task.request", "workers/runtime.py:ChronoqTask"),
    call("celery", "celery.app.task:Task._get_request", "workers/runtime.py:ChronoqTask", ("self",)),
    attr("celery", "celery.app.task:Task.track_started", "workers/runtime.py:ChronoqTask.__call__"),
    attr("celery", "celery.app.task:Context.called_directly", "workers/runtime.py:ChronoqTask.__call__, _in_worker"),
    attr("celery", "celery.app.task:Context.is_eager", "workers/runtime.py:_in_worker"),
    call("celery", "celery.app.task:get_actual_ignore_result", "workers/runtime.py:_in_worker", ("task", "req")),
    call("celery", "celery.backends.base:Backend.store_result", "workers/runtime.py:ChronoqTask._store_started",
         ("self", "task_id", "result", "state"), ("request",)),
    attr("celery", "celery.worker.components:Hub", "workers/timers.py:TimerCompaction.requires"),
    attr("celery", "celery.bootsteps:Step.requires", "workers/timers.py:TimerCompaction"),
    override("celery", "celery.bootsteps:Step.__init__", "workers/timers.py:TimerCompaction",
             ("self", "parent", "**kwargs")),
    override("celery", "celery.bootsteps:StartStopStep.start", "workers/timers.py:TimerCompaction", ("self", "parent")),
    override("celery", "celery.bootsteps:StartStopStep.stop", "workers/timers.py:TimerCompaction", ("self", "parent")),
    inst("kombu", "kombu.asynchronous.timer:Timer._queue", "workers/timers.py:compact"),
    attr("kombu", "kombu.asynchronous.timer:Entry.canceled", "workers/timers.py:compact"),
    call("kombu", "kombu.asynchronous.hub:Hub.call_repeatedly", "workers/timers.py:TimerCompaction.start",
         ("self", "delay", "callback")),
    inst("kombu", "kombu.asynchronous.hub:Hub.timer", "workers/timers.py:TimerCompaction.start"),
    attr("celery", "celery.worker.request:Request.request_dict", "workers/lease.py:WorkerFleet.on_received"),
    attr("celery", "celery.worker.request:Request.worker_pid", "workers/lease.py:WorkerFleet._pool_attempt"),
    attr("celery", "celery.app.task:Context.timelimit", "workers/lease.py:WorkerFleet.time_limit_s"),
    inst("celery", "celery.backends.redis:ResultConsumer.subscribed_to", "shared/client.py:Client.close"),
    attr("celery", "celery.backends.redis:RedisBackend.client", "shared/client.py:Client.close"),
    # -- Celery and kombu: messages encoded as kombu's Redis transport would push them --------
    call("celery", "celery.app.amqp:AMQP.as_task_v2", "scheduler/encoder.py:MessageEncoder._encode",
         ("self", "task_id", "name", "args", "kwargs"),
         ("expires", "reply_to", "time_limit", "soft_time_limit", "ignore_result", "origin", "argsrepr", "kwargsrepr")),
    inst("celery", "celery.app.amqp:AMQP.argsrepr_maxsize", "scheduler/encoder.py:MessageEncoder.__init__"),
    inst("celery", "celery.app.amqp:AMQP.kwargsrepr_maxsize", "scheduler/encoder.py:MessageEncoder.__init__"),
    attr("celery", "celery.app.base:Celery.thread_oid", "scheduler/encoder.py:MessageEncoder.encode"),
    call("celery", "celery.utils.saferepr:saferepr", "scheduler/encoder.py:MessageEncoder._repr", ("o", "maxlen"),
         ("maxlevels",)),
    attr("kombu", KR + "Channel.body_encoding", "scheduler/encoder.py:MessageEncoder.__init__"),
    attr("kombu", KR + "Channel.codecs", "scheduler/encoder.py:MessageEncoder.__init__"),
    attr("kombu", KR + "Channel.default_priority", "scheduler/encoder.py:MessageEncoder.__init__"),
    attr("kombu", KR + "Channel.priority_steps", "scheduler/encoder.py:MessageEncoder.__init__"),
    attr("kombu", KR + "Channel.sep", "scheduler/encoder.py:MessageEncoder.__init__"),
    attr("kombu", KR + "Channel.global_keyprefix", "scheduler/encoder.py:MessageEncoder.__init__"),
    call("kombu", "kombu.entity:maybe_delivery_mode", "scheduler/encoder.py:_delivery_mode", ("v",)),
    # -- APScheduler: the look-ahead scheduler and its heap job store -------------------------
    override("apscheduler", "apscheduler.schedulers.base:BaseScheduler.__init__", f"{LOOK}:LookaheadScheduler",
             ("self", "gconfig", "**options")),
    override("apscheduler", "apscheduler.schedulers.base:BaseScheduler._process_jobs", f"{LOOK}:LookaheadScheduler",
             ("self",)),
    inst("apscheduler", "apscheduler.schedulers.base:BaseScheduler._jobstores_lock", f"{LOOK}:LookaheadScheduler"),
    override("apscheduler", "apscheduler.schedulers.asyncio:AsyncIOScheduler._start_timer",
             f"{LOOK}:LookaheadScheduler", ("self", "wait_seconds")),
    call("apscheduler", "apscheduler.schedulers.asyncio:AsyncIOScheduler._stop_timer",
         f"{LOOK}:LookaheadScheduler._start_timer", ("self",)),
    attr("apscheduler", "apscheduler.schedulers.asyncio:AsyncIOScheduler._timeout", f"{LOOK}:LookaheadScheduler"),
    attr("apscheduler", "apscheduler.schedulers.asyncio:AsyncIOScheduler._eventloop",
         f"{LOOK}:LookaheadScheduler._start_timer"),
    call("apscheduler", "apscheduler.schedulers.asyncio:AsyncIOScheduler.wakeup", f"{LOOK}:LookaheadScheduler.add",
         ("self",)),
    attr("apscheduler", "apscheduler.job:Job._scheduler", f"{LOOK}:LookaheadScheduler.add"),
    attr("apscheduler", "apscheduler.job:Job._jobstore_alias", f"{LOOK}:LookaheadScheduler.add"),
    attr("apscheduler", "apscheduler.job:Job.func_ref", f"{LOOK}:LookaheadScheduler.add"),
    attr("apscheduler", "apscheduler.job:Job.misfire_grace_time", f"{LOOK}:LookaheadScheduler.add"),
    attr("apscheduler", "apscheduler.job:Job.max_instances", f"{LOOK}:LookaheadScheduler.add"),
    attr("apscheduler", "apscheduler.job:Job.next_run_time", f"{LOOK}:LookaheadScheduler.add"),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.__init__", f"{LOOK}:HeapJobStore", None),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.lookup_job", f"{LOOK}:HeapJobStore",
             ("self", "job_id")),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.get_due_jobs", f"{LOOK}:HeapJobStore",
             ("self", "now")),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.get_next_run_time", f"{LOOK}:HeapJobStore",
             ("self",)),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.get_all_jobs", f"{LOOK}:HeapJobStore",
             ("self",)),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.add_job", f"{LOOK}:HeapJobStore",
             ("self", "job")),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.update_job", f"{LOOK}:HeapJobStore",
             ("self", "job")),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.remove_job", f"{LOOK}:HeapJobStore",
             ("self", "job_id")),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.remove_all_jobs", f"{LOOK}:HeapJobStore",
             ("self",)),
    override("apscheduler", "apscheduler.jobstores.base:BaseJobStore.shutdown", f"{LOOK}:HeapJobStore", ("self",)),
    override("apscheduler", "apscheduler.triggers.base:BaseTrigger.get_next_fire_time",
             "scheduler/triggers.py:LocalCronTrigger", ("self", "previous_fire_time", "now")),
    attr("apscheduler", "apscheduler.triggers.cron.fields:MIN_VALUES", "scheduler/cron.py:parse_cron"),
    attr("apscheduler", "apscheduler.triggers.cron.fields:MAX_VALUES", "scheduler/cron.py:parse_cron"),
    # -- prometheus_client: job series written as its own exposition writes them -------------
    call("prometheus-client", "prometheus_client.openmetrics.exposition:_escape", "scheduler/jobseries.py:label_value",
         ("s", "escaping", "valid_rune_fn")),
    call("prometheus-client", "prometheus_client.utils:floatToGoString", "scheduler/jobseries.py:go_float", ("d",)),
    call("prometheus-client", "prometheus_client.exposition:choose_encoder", "scheduler/exposition.py:MetricsPage.pieces",
         ("accept_header",)),
    override("prometheus-client", "prometheus_client.registry:Collector.collect",
             "scheduler/fleetmetrics.py:FleetCollector", ("self",)),
    override("prometheus-client", "prometheus_client.registry:Collector.collect", "scheduler/metricsd.py:Documented",
             ("self",)),
    # -- uvicorn: the console's server returns on SIGTERM instead of re-raising it -------------
    override("uvicorn", "uvicorn.server:Server.capture_signals", "scheduler/web/serve.py:_server_class", ("self",)),
    call("uvicorn", "uvicorn.server:Server.handle_exit", "scheduler/web/serve.py:_server_class",
         ("self", "sig", "frame")),
    call("uvicorn", "uvicorn.server:Server.run", "scheduler/web/serve.py:serve", ("self", "sockets")),
    # -- FastAPI/Starlette: the API's JSON bodies parsed off the event loop, within limits ------
    override("fastapi", "fastapi.routing:APIRoute.get_route_handler", "scheduler/web/api_v1.py:BodyRoute", ("self",)),
    override("starlette", "starlette.requests:Request.json", "scheduler/web/api_v1.py:BodyRequest", ("self",)),
    # -- pydantic: the Redis URL shown with its password masked ------------------------------
    override("pydantic", "pydantic.types:SecretStr._display", "shared/redis_settings.py:SecretUrl", ("self",)),
    # -- PyYAML: duplicate keys refused, huge integers not built -----------------------------
    override("pyyaml", "yaml.constructor:SafeConstructor.construct_mapping", "scheduler/jobfiles.py:_SafeLoader",
             ("self", "node", "deep")),
    override("pyyaml", "yaml.constructor:SafeConstructor.construct_yaml_int", "scheduler/jobfiles.py:_SafeLoader",
             ("self", "node")),
)  # fmt: skip

CLASS_FACTORIES = {"scheduler/web/serve.py": ("scheduler.web.serve", "_server_class")}
"""Product classes defined inside a function (imported lazily), and the function returning them."""


def _resolve(path: str) -> tuple[Any, Any, str]:
    """(owner, object or None, name) for ``module:Owner.name``; raises LookupError naming what is
    missing."""
    module_name, _, qualname = path.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"module {module_name} cannot be imported ({exc})") from exc
    *outer, name = qualname.split(".")
    for part in outer:
        if not hasattr(owner, part):
            raise LookupError(f"{module_name} has no {part}")
        owner = getattr(owner, part)
    return owner, inspect.getattr_static(owner, name, None), name


def _params(function: Any) -> tuple[str, ...]:
    if isinstance(function, staticmethod | classmethod):
        function = function.__func__
    prefix: dict[inspect._ParameterKind, str] = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    return tuple(prefix.get(p.kind, "") + p.name for p in inspect.signature(function).parameters.values())


def _sets_instance_attribute(owner: type, name: str) -> bool:
    """``self.name`` appears in the source of ``owner`` or a class it inherits from (set in
    ``__init__`` or elsewhere), or ``owner`` has it (class attribute, slot, property)."""
    if hasattr(owner, name):
        return True
    pattern = re.compile(rf"\bself\.{re.escape(name)}\b")
    for cls in owner.__mro__:
        if cls is object:
            continue
        try:
            if pattern.search(inspect.getsource(cls)):
                return True
        except (OSError, TypeError):
            continue
    return False


def check(entry: Name) -> str | None:
    """What is wrong with ``entry`` in the installed library, or None."""
    try:
        owner, found, name = _resolve(entry.path)
    except LookupError as exc:
        return f"{entry.path} is gone: {exc}"
    if entry.kind == OPTION:
        options = getattr(owner, "from_transport_options", ())
        return None if name in options else f"{entry.path} is no transport option any more (from_transport_options)"
    if entry.kind == INSTANCE:
        return None if _sets_instance_attribute(owner, name) else f"{entry.path} is gone (no self.{name} in its class)"
    if found is None and not hasattr(owner, name):
        return f"{entry.path} is gone"
    if entry.params is None and not entry.keywords:
        return None
    try:
        if entry.signature_of is not None:
            target_owner, _, target_name = _resolve(entry.signature_of)
            params = _params(getattr(target_owner, target_name))
        else:
            params = _params(getattr(owner, name))
    except (TypeError, ValueError, AttributeError, LookupError) as exc:
        return f"{entry.path}: no signature to check ({exc})"
    problems = []
    expected = tuple(entry.params or ())
    actual = params if entry.exact else params[: len(expected)]
    if actual != expected:
        missing = [p for p in expected if p not in params]
        added = [p for p in params if p not in expected] if entry.exact else []
        detail = "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"new {added}" if added else "") if part
        )
        problems.append(
            f"chronoq expects ({', '.join(expected)}), found ({', '.join(params)})" + (f": {detail}" if detail else "")
        )
    unnamed = [keyword for keyword in entry.keywords if keyword not in params]
    if unnamed:
        problems.append(f"passed by name but not parameters any more: {unnamed}")
    return f"{entry.path}: " + "; ".join(problems) if problems else None


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


@pytest.mark.parametrize("entry", NAMES, ids=[f"{e.library}:{e.path}@{e.file}" for e in NAMES])
def test_name_is_as_chronoq_expects(entry: Name) -> None:
    problem = check(entry)
    if problem is not None:
        pytest.fail(
            f"{entry.library} {_version(entry.library)}: {problem} ({entry.kind} used by chronoq in {entry.used_in})",
            pytrace=False,
        )


# -- the table is complete: a static scan of the product code ---------------------------------

CHRONOQ_PRIVATE = {("scheduler/metricsd.py", "_ping"): "scheduler.probes:Probes._ping (chronoq's own)"}
"""Private names of chronoq itself that a module reads or sets across modules."""
DOCUMENTED = {"model_config"}
"""Public names a subclass is documented to define (pydantic's model configuration)."""


def _product_files() -> list[Path]:
    files = [ROOT / name for name in ENTRY_POINTS]
    for package in PRODUCT:
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return files


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in (*PRODUCT, "run_scheduler", "run_worker", "builtins") and top not in sys.stdlib_module_names


def _classes(tree: ast.Module) -> Iterator[tuple[ast.ClassDef, list[str], bool]]:
    """Each class in ``tree``: its node, its qualified name, whether it is defined in a function."""

    def visit(node: ast.AST, qualname: list[str], in_function: bool) -> Iterator[tuple[ast.ClassDef, list[str], bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield child, [*qualname, child.name], in_function
                yield from visit(child, [*qualname, child.name], in_function)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, [*qualname, child.name], True)
            else:
                yield from visit(child, qualname, in_function)

    yield from visit(tree, [], False)


def _runtime_class(path: Path, qualname: list[str], in_function: bool) -> type:
    rel = path.relative_to(ROOT).as_posix()
    if in_function:
        module_name, factory = CLASS_FACTORIES[rel]  # a KeyError: add the class's factory there
        found: Any = getattr(importlib.import_module(module_name), factory)()
        assert found.__name__ == qualname[-1], f"{rel}: {factory}() returns {found.__name__}, not {qualname[-1]}"
        return found  # type: ignore[no-any-return]
    found = importlib.import_module(_module_name(path))
    for part in qualname:
        found = getattr(found, part)
    return found  # type: ignore[no-any-return]


def _library_classes(cls: type) -> list[type]:
    return [base for base in cls.__mro__[1:] if _is_third_party(base.__module__)]


def _library_defines(bases: list[type], name: str) -> bool:
    """A class of the library defines ``name`` (a function of the library itself: not a
    ``typing.Protocol``'s ``__init__``), or its source uses ``name``."""
    for base in bases:
        value = vars(base).get(name)
        if value is not None:
            function = getattr(value, "__func__", value)
            module = getattr(function, "__module__", None) if inspect.isfunction(function) else base.__module__
            if module is None or _is_third_party(module):
                return True
    if not _private(name):
        return False
    return any(name in _identifiers(base) for base in bases)


@functools.cache
def _identifiers(cls: type) -> frozenset[str]:
    """The words in ``cls``'s source (empty when it has none, as a C extension's)."""
    try:
        return frozenset(re.findall(r"\w+", inspect.getsource(cls)))
    except (OSError, TypeError):
        return frozenset()


def _subclass_uses(path: Path, tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(name, where) for each name a subclass of a library class defines over one of its
    library base classes' (methods and class attributes), and each ``self._name`` it reads or
    sets that a library base class uses."""
    if _module_name(path) in NOT_IMPORTED:
        return
    for node, qualname, in_function in _classes(tree):
        bases = _library_classes(_runtime_class(path, qualname, in_function))
        if not bases:
            continue
        where = ".".join(qualname)
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [item.name]
            elif isinstance(item, ast.Assign):
                names = [target.id for target in item.targets if isinstance(target, ast.Name)]
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names = [item.target.id]
            else:
                names = []
            for name in names:
                dunder = name.startswith("__") and name not in ("__init__", "__call__")
                if not dunder and _library_defines(bases, name):
                    yield name, f"{where} overrides it"
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
                and _private(sub.attr)
                and _library_defines(bases, sub.attr)
            ):
                yield sub.attr, f"{where} line {sub.lineno}: self.{sub.attr}"


def _defined(tree: ast.Module) -> set[str]:
    """Names the module defines: functions, classes, assigned names and ``self``/``cls``
    attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name):
                    names.add(leaf.id)
                elif (
                    isinstance(leaf, ast.Attribute)
                    and isinstance(leaf.value, ast.Name)
                    and leaf.value.id in ("self", "cls")
                ):
                    names.add(leaf.attr)
    return names


def _stdlib_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to standard-library modules (``sys._getframe`` is no library's private)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in sys.stdlib_module_names:
                    aliases.add((alias.asname or alias.name).split(".")[0])
    return aliases


def _private_uses(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(name, where) for each private name the module reads, sets or imports from a library
    without defining it: ``x._name``, ``getattr(x, "_name")``, ``from lib import _name``."""
    defined, stdlib = _defined(tree), _stdlib_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined:
            if not (isinstance(node.value, ast.Name) and node.value.id in stdlib):
                yield node.attr, f"line {node.lineno}: .{node.attr}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and node.args[1].value not in defined
        ):
            yield node.args[1].value, f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})"
        elif isinstance(node, ast.ImportFrom) and not node.level and _is_third_party(node.module or ""):
            for alias in node.names:
                if _private(alias.name):
                    yield alias.name, f"line {node.lineno}: from {node.module} import {alias.name}"


def _uses() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for path in _product_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        for name, where in [*_subclass_uses(path, tree), *_private_uses(tree)]:
            found.setdefault((rel, name), where)
    return found


def test_every_private_use_is_fenced() -> None:
    """A new override of a library method, or a new private name of a library read anywhere in
    the product code, needs its entry in NAMES (for the file that uses it)."""
    listed = {(entry.file, entry.attr) for entry in NAMES}
    unlisted = [
        f"{file}: {name} ({where})"
        for (file, name), where in sorted(_uses().items())
        if (file, name) not in listed and (file, name) not in CHRONOQ_PRIVATE and name not in DOCUMENTED
    ]
    assert not unlisted, "third-party names used but not in tests/unit/test_compat.py NAMES:\n" + "\n".join(unlisted)


def test_no_stale_entries() -> None:
    """Each entry's name is still mentioned in the file it names (a removed use: remove its entry)."""
    stale = [
        f"{entry.path} ({entry.used_in})"
        for entry in NAMES
        if not re.search(rf"\b{re.escape(entry.attr)}\b", (ROOT / entry.file).read_text())
    ]
    assert not stale, "entries whose file no longer uses the name:\n" + "\n".join(stale)


def test_check_names_what_is_wrong() -> None:
    """The checker itself: a missing name, a changed signature, a keyword no longer a parameter."""
    gone = check(override("kombu", KR + "Channel._no_such_method", f"{TRA}:Channel", ("self",)))
    assert gone is not None and "_no_such_method is gone" in gone
    changed = check(override("kombu", KR + "Channel._brpop_start", f"{TRA}:Channel", ("self", "timeout_s")))
    assert changed is not None and "missing ['timeout_s']" in changed and "new ['timeout']" in changed
    renamed = check(call("celery", "celery.utils.saferepr:saferepr", "x.py:f", ("o",), ("max_levels",)))
    assert renamed is not None and "['max_levels']" in renamed
    assert check(inst("kombu", KR + "Channel._no_such_attribute", f"{TRA}:Channel")) is not None
    assert check(option("kombu", KR + "SentinelChannel.no_such_option", f"{TRA}:SentinelChannel")) is not None
