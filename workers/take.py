# mypy: disable-error-code="no-untyped-call"
"""How a worker takes the next message off its queues without a window in which it can be lost.

kombu's Redis transport takes a message with ``BRPOP``, which removes it from its list, and
then records it as unacknowledged (kombu's unacked index, from which ``restore_visible`` puts
it back after the visibility timeout if the worker never acks it) in a second round trip. When
Redis applies the BRPOP but its reply never reaches the worker (Redis shut down or killed in
between, a Sentinel failover, a connection dropped by the network), the message existed nowhere
any more. :class:`Taker` replaces that BRPOP with two commands sent together on the consuming
connection:

1. a **doorbell** that blocks until the first list (the head of kombu's fair queue cycle, highest
   priority) has an item, without taking it: ``BLMOVE key key RIGHT RIGHT timeout`` moves the
   last item to where it was. It is sent only after a take found every list empty;
2. the **take** (``workers/lua/take.lua``): one script that pops the first item of the lists in
   BRPOP's order and records it in kombu's unacked index in the same step.

Whatever happens to a reply, the message is then either still in its queue or recorded as
unacknowledged, and comes back after the visibility timeout. The cost: a message on any other
list than the doorbell's (another queue the worker consumes, a non-default priority) waits up to
``poll_s`` when the worker was idle, and an idle worker sends two commands every ``poll_s``
instead of one every ``brpop_timeout``.

A server at ``maxmemory`` (``noeviction``) refuses BLMOVE (it may grow memory) but still runs
the take (its first write is a pop); the doorbell is then a ``BLPOP`` on a key nobody writes
(a server-side sleep) until the server takes writes again.
"""

from __future__ import annotations

import hashlib
import time
from queue import Empty
from typing import Any

import redis
from loguru import logger

from workers.lua import source

POLL_S = 0.2
"""The doorbell's timeout when the worker consumes more than one list (see the module docstring)."""
OOM_BACKOFF_S = 5.0
"""After a refusal for memory, the doorbell is a plain sleep this long before BLMOVE is tried again."""


class Taken:
    """One item taken off ``list_key`` (key prefix removed); ``recorded``: it is in kombu's
    unacked index under ``tag`` already (see :class:`workers.transport.QoS`)."""

    __slots__ = ("item", "list_key", "recorded")

    def __init__(self, list_key: str, item: bytes, recorded: bool) -> None:
        self.list_key, self.item, self.recorded = list_key, item, recorded


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class Taker:
    """Sends and reads the doorbell and the take for one kombu channel.

    ``prefix`` is kombu's ``global_keyprefix`` (the commands go out as they are, so the keys are
    prefixed here); ``unacked_key`` and ``unacked_index_key`` are the channel's; ``idle_key``
    (:attr:`shared.names.RedisKeys.idle`) is what the doorbell waits on at maxmemory.
    """

    def __init__(
        self, prefix: str, unacked_key: str, unacked_index_key: str, idle_key: str, poll_s: float = POLL_S
    ) -> None:
        self.prefix = prefix
        self.idle_key = idle_key
        self.unacked = (prefix + unacked_key, prefix + unacked_index_key)
        self.poll_s = poll_s
        self._script = source("take")
        self._sha = hashlib.sha1(self._script.encode(), usedforsecurity=False).hexdigest()
        self._cached = False
        """Whether Redis has the script (EVALSHA) as far as we know: a restarted or other
        server does not, and answers NOSCRIPT, having run nothing; the next take sends it whole."""
        self._rang = False
        self._ring = True
        """Whether the next send starts with the doorbell: not after a take that found an item
        (more are likely waiting: the take alone, one command per message)."""
        self._oom_until = 0.0
        self._slept = False
        """Whether the doorbell last sent was the sleep (Redis was at maxmemory)."""

    def send(self, connection: Any, keys: list[str], acked: list[bool], timeout_s: float) -> None:
        """Send the next doorbell (when due) and take on ``connection`` (kombu's BRPOP
        connection); ``keys`` unprefixed, in BRPOP's order; ``acked``: per key, whether its
        consumer acknowledges (what it takes is recorded); ``timeout_s`` 0 waits for ever."""
        full = [self.prefix + key for key in keys]
        flags = "".join("1" if ack else "0" for ack in acked)
        script = ("EVALSHA", self._sha) if self._cached else ("EVAL", self._script)
        take = (*script, 2 + len(full), *self.unacked, *full, f"{time.time():.6f}", flags)
        self._cached = True
        commands: list[tuple[Any, ...]] = [take]
        self._rang = self._ring
        if self._ring:
            wait_s = timeout_s if len(full) == 1 else min(timeout_s or self.poll_s, self.poll_s)
            self._slept = time.monotonic() < self._oom_until
            if self._slept:
                doorbell: tuple[Any, ...] = ("BLPOP", self.idle_key, wait_s)
            else:
                doorbell = ("BLMOVE", full[0], full[0], "RIGHT", "RIGHT", wait_s)
            commands.insert(0, doorbell)
        connection.send_packed_command(connection.pack_commands(commands))

    def read(self, client: redis.Redis, connection: Any) -> Taken:
        """The item the take returned; raises ``Empty`` when there was none, the doorbell's
        Redis error (after reading both replies, so the connection stays usable) or the take's,
        and connection errors as they come."""
        refusal: redis.ResponseError | None = None
        if self._rang:
            try:
                client.parse_response(connection, "BLMOVE")
            except redis.ResponseError as exc:
                refusal = exc
        try:
            reply = client.parse_response(connection, "EVAL")
        except redis.exceptions.NoScriptError:
            reply, self._cached = None, False
        except redis.ResponseError as exc:
            reply, refusal = None, refusal or exc
        if refusal is not None:
            if not isinstance(refusal, redis.exceptions.OutOfMemoryError):
                raise refusal
            if not self._oom_until:
                logger.warning("Redis is at maxmemory: the worker polls its queues every {}s", self.poll_s)
            self._oom_until = time.monotonic() + OOM_BACKOFF_S
        elif self._rang and not self._slept and self._oom_until:
            logger.info("Redis takes writes again: the worker waits on its queue again")
            self._oom_until = 0.0
        self._ring = not reply and self._cached
        if not reply:
            raise Empty()
        list_key, item, recorded = reply
        return Taken(_text(list_key).removeprefix(self.prefix), item, recorded == 1)
