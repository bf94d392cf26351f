"""The lock of kombu's restore sweep, which a Redis restart can no longer leave held.

A message taken but never acknowledged (its worker died, or Redis went away before the reply
or the ack) waits in kombu's unacked index until a consumer's restore sweep
(``QoS.restore_visible``) puts it back on its queue, once it is older than the visibility
timeout. Each sweep runs under a Redis lock, ``unacked_mutex``, so that the workers take turns.

kombu releases that lock in a ``finally`` that lets a connection error through: a sweep that
Redis left in the middle (a shutdown or a kill, a failover, a dropped connection) never
released it, and a lock whose ``SET`` Redis applied but whose reply was lost was never known
to be held at all. The lock then outlived the restart (the AOF keeps a key's expiry as an
absolute time) and every sweep of every worker was skipped until it expired: kombu's default
is 300 s, five minutes in which no message of a dead worker or a lost reply ran (issue #23).

Here (:class:`SweepLock`):

- the expiry is short: ``unacked_mutex_expire``, set by :func:`shared.celery_app.celery_config`
  to the sweep interval (1-10 s), so a lock whose holder died holds back one sweep at most
  (two sweeps that overlap are harmless: kombu restores each message in a ``WATCH``
  transaction, so a message is put back once);
- the token is kept before the ``SET`` is sent, for the process (a reconnect makes new
  channels), until a release is known to have run: the next sweep first releases a lock this
  process may still hold, if it still holds it, so the sweep after a reconnect runs at once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from redis.exceptions import LockNotOwnedError


class SweepLock:
    """Takes and releases the sweep's lock for one process, owing a release across errors."""

    def __init__(self) -> None:
        self._owed: dict[str, str] = {}
        """Lock key -> the token of a lock this process may still hold there."""
        self._guard = threading.Lock()

    @contextmanager
    def held(self, client: Any, key: str, expire_s: float) -> Iterator[bool]:
        """Yields whether this sweep holds ``key`` (for ``expire_s`` at most); releases it on
        the way out. Redis errors are raised: the release is then owed, and the next call on
        this process makes it first."""
        self.settle(client, key)
        token = uuid.uuid4().hex
        with self._guard:
            self._owed[key] = token  # before the SET: Redis may apply it and its reply be lost
        lock = client.lock(key, timeout=expire_s)
        # Refused: another sweep holds it, or this one does, its first SET applied and the
        # reply lost before redis-py's retry.
        if not lock.acquire(blocking=False, token=token) and client.get(key) not in (token, token.encode()):
            self._forget(key, token)
            yield False
            return
        try:
            yield True
        finally:
            self._release(client, key, token)

    def settle(self, client: Any, key: str) -> None:
        """Release ``key`` if this process may still hold it (a release it owes)."""
        with self._guard:
            token = self._owed.get(key)
        if token is not None:
            self._release(client, key, token)

    def _release(self, client: Any, key: str, token: str) -> None:
        # Deletes the key only while it holds this token; LockNotOwnedError: it expired (or
        # another sweep has it since), nothing of ours is held.
        with suppress(LockNotOwnedError):
            client.lock(key).do_release(token)
        self._forget(key, token)

    def _forget(self, key: str, token: str) -> None:
        with self._guard:
            if self._owed.get(key) == token:
                del self._owed[key]


SWEEP_LOCK = SweepLock()
"""The process's sweep lock: what it owes outlives the channels of a connection that dropped."""
