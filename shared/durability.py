# mypy: disable-error-code="no-untyped-call"
"""``WAIT``-based durability (``REDIS_WAIT_REPLICAS``): a chronoq write counts only once replicas
have it, so a failover cannot discard it.

Redis replication is asynchronous. After a graceful ``SENTINEL FAILOVER`` the old master stays
up and takes writes for about a second after its replica was promoted (until the Sentinels name
the new master), and all of them are discarded when it is demoted. With
``REDIS_WAIT_REPLICAS=n`` every command of a chronoq client that may write (scripts included)
is sent together with ``WAIT n REDIS_WAIT_TIMEOUT_MS`` in one round trip, and its reply counts
only if ``n`` replicas acknowledged it. A promoted replica no longer acknowledges the old
master, so every write that would be discarded comes back short: it raises
:class:`~shared.errors.NotReplicatedError`, a ``redis.ConnectionError``, which every caller
already retries as a dropped connection: redis-py's own retry reconnects (asking the
Sentinels) and chronoq's loops try again, until the write is confirmed on the master the
Sentinels name. chronoq's writes are safe to repeat (a fire is decided once by its id, a run
lease is recognised by its delivery token, an outcome applies once), because a write that
came back short may still have reached the replica that was promoted.

**Fewer replicas than ``n``.** After a failover the new master has no replica until the old one
rejoins (about 11 s later with Sentinel's fixed delay, never if it died), and a replica may be
down for hours. Refusing every write then would stop the fleet. So a shortfall is accepted when
it cannot be a failover: the master itself lists fewer than ``n`` connected replicas (``ROLE``),
and *every* Sentinel answers, names this very server as the master and flags nothing else on it
(no failover in progress, not down). Writes then wait for the replicas that are connected (none:
no wait) and this verdict is asked again every ``REDIS_SENTINEL_CHECK_S``, before a write. The
leading Sentinel flags ``failover_in_progress`` from the moment a failover starts until it names
the new master, and the others name the old one until they learn the new, so the writes of the
failover window are never accepted this way. Without Sentinel there is no one to ask: a
shortfall is always retried (writes wait while a replica is missing). Each process logs a
change of state once (replicas short, writing without them, confirmed again), not every write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.client
import redis.client
from loguru import logger

from shared.errors import NotReplicatedError

_NO_WAIT_NAMES = """
GET MGET GETRANGE STRLEN EXISTS TYPE TTL PTTL EXPIRETIME PEXPIRETIME HGET HMGET HGETALL HKEYS
HVALS HLEN HEXISTS HSTRLEN HSCAN HRANDFIELD LRANGE LLEN LINDEX LPOS SMEMBERS SISMEMBER
SMISMEMBER SCARD SSCAN SRANDMEMBER SINTER SUNION SDIFF ZRANGE ZRANGEBYSCORE ZREVRANGE
ZREVRANGEBYSCORE ZRANGEBYLEX ZSCORE ZMSCORE ZCARD ZCOUNT ZRANK ZREVRANK ZSCAN XRANGE XREVRANGE
XLEN XREAD XINFO XPENDING SCAN KEYS RANDOMKEY DBSIZE PING ECHO INFO TIME ROLE CONFIG CLIENT
SCRIPT COMMAND MEMORY OBJECT SLOWLOG LASTSAVE EVAL_RO EVALSHA_RO FCALL_RO WAIT SENTINEL PUBLISH
PUBSUB WATCH UNWATCH SELECT AUTH HELLO READONLY READWRITE
"""
NO_WAIT = frozenset(_NO_WAIT_NAMES.split())
"""Commands that change no data (or, like ``PUBLISH``, nothing a failover could lose): no
``WAIT`` behind them. Everything else, scripts included, is treated as a write."""


def writes(command: Any) -> bool:
    """Whether ``command`` (a name such as ``EVALSHA`` or ``SENTINEL MASTER``) may write data."""
    name = command.decode() if isinstance(command, bytes) else str(command)
    return name.split(" ", 1)[0].upper() not in NO_WAIT


def connected_replicas(role: Any) -> int | None:
    """The number of replicas a ``ROLE`` reply lists, or None if the server is not a master."""
    if not isinstance(role, list | tuple) or not role:
        return None
    kind = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
    if kind != "master" or len(role) < 3:
        return None
    return len(role[2])


def names_this_master(state: Any, host: str, port: int) -> bool:
    """Whether one Sentinel's ``SENTINEL MASTER`` reply names ``host:port`` and flags nothing
    but ``master`` on it (no ``failover_in_progress``, ``s_down``, ``o_down``...)."""
    if not isinstance(state, dict):
        return False
    flags = state.get("flags", "")
    flag_set = set(flags.split(",")) if isinstance(flags, str) else set(flags)
    try:
        same = (str(state["ip"]), int(state["port"])) == (str(host), int(port))
    except (KeyError, TypeError, ValueError):
        return False
    return same and flag_set == {"master"}


def degraded_target(
    replicas: int, connected: int | None, sentinel_states: list[Any], host: str, port: int
) -> int | None:
    """The pure rule: how many replicas a write may wait for when fewer than ``replicas``
    confirmed it, or None (retry it: it may be on a master that was replaced).

    ``connected`` is what the master's ``ROLE`` lists (None: it is not a master);
    ``sentinel_states`` holds every Sentinel's ``SENTINEL MASTER`` reply (None for one that did
    not answer)."""
    if connected is None or connected >= replicas or not sentinel_states:
        return None
    if not all(names_this_master(state, host, port) for state in sentinel_states):
        return None
    return connected


@dataclass(frozen=True)
class _Verdict:
    address: tuple[str, int]
    target: int
    until: float


class _Report:
    """Logs each change of this process's durability state once: ``ok``, ``short`` (writes
    retried), ``degraded`` (writing with fewer replicas)."""

    def __init__(self) -> None:
        self.state = "ok"
        self._lock = threading.Lock()

    def change(self, state: str, message: str) -> None:
        with self._lock:
            if state == self.state:
                return
            self.state = state
        (logger.info if state == "ok" else logger.warning)("{}", message)


REPORT = _Report()


class Durability:
    """One client's ``WAIT`` settings and the verdict about missing replicas (thread-safe)."""

    def __init__(self, replicas: int, timeout_ms: int, check_s: float) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.check_s = check_s
        self._lock = threading.Lock()
        self._verdict: _Verdict | None = None

    def wait_command(self, target: int) -> tuple[str, int, int]:
        return ("WAIT", target, self.timeout_ms)

    def planned(self, connection: Any) -> int | None:
        """Replicas to wait for on ``connection``: ``replicas``, fewer while a verdict holds for
        its server, or None when that verdict expired (verify again before writing)."""
        with self._lock:
            verdict = self._verdict
        if verdict is None or verdict.address != _address(connection):
            return self.replicas
        return verdict.target if time.monotonic() < verdict.until else None

    def judge(self, connection: Any, connected: int | None, states: list[Any]) -> int | None:
        """Record and return the verdict :func:`degraded_target` gives for ``connection``."""
        host, port = _address(connection)
        target = degraded_target(self.replicas, connected, states, host, port)
        with self._lock:
            self._verdict = None if target is None else _Verdict((host, port), target, time.monotonic() + self.check_s)
        if target is not None:
            REPORT.change(
                "degraded",
                f"redis writes wait for {target} of REDIS_WAIT_REPLICAS={self.replicas} replicas: the master "
                f"{host}:{port} has only {connected} connected and every Sentinel names it, with no failover "
                f"under way; asked again every {self.check_s:g} s",
            )
        return target

    def confirmed(self, connection: Any, acked: Any, target: int) -> bool:
        """Whether a write's ``WAIT`` reply ``acked`` meets ``target``."""
        if isinstance(acked, int) and acked >= target:
            if target >= self.replicas:
                REPORT.change("ok", f"redis writes confirmed by {self.replicas} replicas again")
            return True
        return False

    def refuse(self, connection: Any, acked: Any, target: int) -> NotReplicatedError:
        host, port = _address(connection)
        REPORT.change(
            "short",
            f"redis writes not confirmed by REDIS_WAIT_REPLICAS={self.replicas} replicas within {self.timeout_ms} ms "
            f"on {host}:{port}: retried (on the master the Sentinels name) until they are; a failover is under "
            "way, or replicas are missing",
        )
        got = acked if isinstance(acked, int) else f"none ({acked})"
        return NotReplicatedError(
            f"write confirmed by {got} of {target} replicas within {self.timeout_ms} ms on {host}:{port}"
        )


def _address(connection: Any) -> tuple[str, int]:
    return str(getattr(connection, "host", "")), int(getattr(connection, "port", 0) or 0)


def _sentinels(connection: Any) -> tuple[list[Any], str] | None:
    pool = getattr(connection, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None:
        return None
    return list(manager.sentinels), str(getattr(pool, "service_name", ""))


def _reply(connection: Any) -> Any:
    try:
        return connection.read_response()
    except redis.ResponseError as exc:  # WAIT on a server that became a replica
        return exc


async def _areply(connection: Any) -> Any:
    try:
        return await connection.read_response()
    except redis.ResponseError as exc:
        return exc


def _verify(durability: Durability, connection: Any) -> int | None:
    found = _sentinels(connection)
    if found is None:
        return None
    sentinels, name = found
    connection.send_command("ROLE")
    connected = connected_replicas(connection.read_response())
    states: list[Any] = []
    if connected is not None and connected < durability.replicas:
        for sentinel in sentinels:
            try:
                states.append(sentinel.execute_command("SENTINEL MASTER", name))
            except (redis.RedisError, OSError):
                states.append(None)
    return durability.judge(connection, connected, states)


def _target(durability: Durability, connection: Any) -> int:
    planned = durability.planned(connection)
    if planned is None:
        planned = _verify(durability, connection)
    return durability.replicas if planned is None else planned


def _settle(durability: Durability, connection: Any, acked: Any, target: int) -> None:
    if durability.confirmed(connection, acked, target):
        return
    if isinstance(acked, int):
        verdict = _verify(durability, connection)
        if verdict is not None and acked >= verdict:
            return
    raise durability.refuse(connection, acked, target)


class WaitingRedis(redis.Redis):
    """A blocking client whose writes wait for replicas (``durability``; None: none)."""

    durability: Durability | None = None

    def _send_command_parse_response(self, conn: Any, command_name: Any, *args: Any, **options: Any) -> Any:
        durability = self.durability
        if durability is None or not writes(command_name):
            return super()._send_command_parse_response(conn, command_name, *args, **options)
        target = _target(durability, conn)
        conn.send_packed_command(conn.pack_commands([args, durability.wait_command(target)]))
        try:
            result, error = self.parse_response(conn, command_name, **options), None
        except redis.ResponseError as exc:
            result, error = None, exc
        _settle(durability, conn, _reply(conn), target)
        if error is not None:
            raise error
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = WaitingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.durability = self.durability
        return pipe


class WaitingPipeline(redis.client.Pipeline):
    """:class:`WaitingRedis`'s pipeline: a batch with a write waits once, at its end."""

    durability: Durability | None = None

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        durability = self.durability
        if durability is None or not any(writes(args[0]) for args, _ in commands):
            return super()._execute_pipeline(connection, commands, raise_on_error)
        target = _target(durability, connection)
        responses = super()._execute_pipeline(connection, [*commands, (durability.wait_command(target), {})], False)
        _settle(durability, connection, responses.pop(), target)
        if raise_on_error:
            self.raise_first_error(commands, responses)
        return responses

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        durability = self.durability
        if durability is None or not any(writes(args[0]) for args, _ in commands):
            return super()._execute_transaction(connection, commands, raise_on_error)
        target = _target(durability, connection)
        responses = super()._execute_transaction(connection, commands, False)
        # WAIT cannot ride inside MULTI (it would not block); one more round trip after EXEC.
        connection.send_command(*durability.wait_command(target))
        _settle(durability, connection, _reply(connection), target)
        if raise_on_error:
            self.raise_first_error(commands, responses)
        return responses


async def _averify(durability: Durability, connection: Any) -> int | None:
    found = _sentinels(connection)
    if found is None:
        return None
    sentinels, name = found
    await connection.send_command("ROLE")
    connected = connected_replicas(await connection.read_response())
    states: list[Any] = []
    if connected is not None and connected < durability.replicas:
        for sentinel in sentinels:
            try:
                states.append(await sentinel.execute_command("SENTINEL MASTER", name))
            except (redis.RedisError, OSError):
                states.append(None)
    return durability.judge(connection, connected, states)


async def _atarget(durability: Durability, connection: Any) -> int:
    planned = durability.planned(connection)
    if planned is None:
        planned = await _averify(durability, connection)
    return durability.replicas if planned is None else planned


async def _asettle(durability: Durability, connection: Any, acked: Any, target: int) -> None:
    if durability.confirmed(connection, acked, target):
        return
    if isinstance(acked, int):
        verdict = await _averify(durability, connection)
        if verdict is not None and acked >= verdict:
            return
    raise durability.refuse(connection, acked, target)


class AsyncWaitingRedis(redis.asyncio.Redis):
    """:class:`WaitingRedis` for asyncio."""

    durability: Durability | None = None

    async def _send_command_parse_response(self, conn: Any, command_name: Any, *args: Any, **options: Any) -> Any:
        durability = self.durability
        if durability is None or not writes(command_name):
            return await super()._send_command_parse_response(conn, command_name, *args, **options)
        target = await _atarget(durability, conn)
        await conn.send_packed_command(conn.pack_commands([args, durability.wait_command(target)]))
        try:
            result, error = await self.parse_response(conn, command_name, **options), None
        except redis.ResponseError as exc:
            result, error = None, exc
        await _asettle(durability, conn, await _areply(conn), target)
        if error is not None:
            raise error
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = AsyncWaitingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.durability = self.durability
        return pipe


class AsyncWaitingPipeline(redis.asyncio.client.Pipeline):
    """:class:`WaitingPipeline` for asyncio."""

    durability: Durability | None = None

    async def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        durability = self.durability
        if durability is None or not any(writes(args[0]) for args, _ in commands):
            return await super()._execute_pipeline(connection, commands, raise_on_error)
        target = await _atarget(durability, connection)
        wait: Any = (durability.wait_command(target), {})
        responses = await super()._execute_pipeline(connection, [*commands, wait], False)
        await _asettle(durability, connection, responses.pop(), target)
        if raise_on_error:
            self.raise_first_error(commands, responses)
        return responses

    async def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        durability = self.durability
        if durability is None or not any(writes(args[0]) for args, _ in commands):
            return await super()._execute_transaction(connection, commands, raise_on_error)
        target = await _atarget(durability, connection)
        responses = await super()._execute_transaction(connection, commands, False)
        await connection.send_command(*durability.wait_command(target))
        await _asettle(durability, connection, await _areply(connection), target)
        if raise_on_error:
            self.raise_first_error(commands, responses)
        return responses
