"""Messages a worker cannot read: logged without their body, set aside, counted.

A queue item that is no kombu message (set aside by :mod:`workers.transport`) or a message
whose body or content type Celery refuses (:mod:`workers.consumer`) never stops a worker. It is
logged with its size and a hash only (a body may carry secrets), pushed onto
``<prefix>poison`` (newest first, the last :data:`DEAD_LETTER_MAX` kept, so an operator can
look at it), counted as ``poison`` in ``<prefix>counters`` (``chronoq status`` shows it), and
removed from the queue for good.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from shared.names import RedisKeys

DEAD_LETTER_MAX = 100
POISON_COUNTER = "poison"


class PoisonSink:
    """Where a worker sets aside what it cannot read, under one key prefix."""

    def __init__(self, key_prefix: str) -> None:
        self.keys = RedisKeys(key_prefix)

    def set_aside(self, client: Callable[[], Any], raw: bytes, queue: str, reason: str) -> None:
        """Log, keep and count one unreadable message. ``client`` returns a Redis client
        (called only here, so a sink costs nothing until a poison message comes); ``reason``
        names the error (its type, never its text, which may quote the body). A Redis error is
        logged: the message is gone from the queue either way."""
        digest = hashlib.sha256(raw).hexdigest()[:16]
        logger.error(
            "poison message set aside queue={} size={} sha256={} reason={} (body not logged; see {})",
            queue,
            len(raw),
            digest,
            reason,
            self.keys.poison,
        )
        entry = {
            "queue": queue,
            "reason": reason,
            "size": len(raw),
            "sha256": digest,
            "seen_ms": int(time.time() * 1000),
            "raw_b64": base64.b64encode(raw).decode("ascii"),
        }
        try:
            pipe = client().pipeline()
            pipe.lpush(self.keys.poison, json.dumps(entry))
            pipe.ltrim(self.keys.poison, 0, DEAD_LETTER_MAX - 1)
            pipe.hincrby(self.keys.counters, POISON_COUNTER, 1)
            pipe.execute()
        except Exception as exc:  # a broken Redis must not turn a poison message into a crash
            logger.error("poison message not recorded sha256={}: {}", digest, type(exc).__name__)
