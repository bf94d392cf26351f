"""Noticing that Redis lost its data (a restart without persistence, a failover to an empty
replica, a FLUSHALL), and putting back what the replicas own.

Without it, fires resume after such a loss (every replica still runs its jobs) but the job
registry is gone: ``chronoq jobs pause ID`` answers "no job registered" while the job keeps
firing, and nothing says why.

The marker is one key, ``epoch``: JSON ``{"id", "losses", "since"}``. The first replica to
start on an empty Redis writes it with a random id; later ones adopt it. Every replica reads it
once a second. Gone means the data is gone: the replica that writes the new marker first
(``SET NX``) counts the loss (``losses`` = the count it last saw + 1, so the count outlives the
loss that erased it), every replica logs it once at ERROR and rewrites what it owns (the job
registry; its heartbeat and the lease come back at the next renewal). A marker with another id
means another replica already counted this loss.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from loguru import logger

from shared.names import RedisKeys
from shared.redis import raise_if_cancelling
from shared.redis_checks import eviction_policy, eviction_problem

CHECK_EVERY_S = 1.0


class DataEpoch:
    """This replica's view of the marker; :meth:`watch` checks it until cancelled."""

    def __init__(self, client: redis.asyncio.Redis, keys: RedisKeys, on_loss: Callable[[], Awaitable[None]]) -> None:
        self.client = client
        self.keys = keys
        self.on_loss = on_loss
        """Rewrites what this replica owns (called once per loss, after it is logged)."""
        self.id: str | None = None
        self.losses = 0
        self._rewrite_pending = False

    async def claim(self) -> None:
        """At start: write a new marker on an empty Redis, else adopt the one there."""
        self._adopt(await self._create(self.losses))

    async def check(self) -> bool:
        """Read the marker once; True when Redis lost its data since the last check (the loss
        is then logged and counted, and :attr:`on_loss` is run, again at every check until it
        succeeds)."""
        found = await self.client.get(self.keys.epoch)
        if found is not None and self._parse(str(found)).get("id") == self.id:
            await self._rewrite()
            return False
        raw, created = (str(found), False) if found is not None else await self._create(self.losses + 1)
        previous = self.id
        self._adopt((raw, created))
        logger.error(
            "redis lost its data (the epoch marker of {} is {}): loss #{} since the first start; rewriting the job "
            "registry; paused and removed flags, fire history, counters and queued messages from before are gone",
            previous,
            "gone" if created else f"replaced by {self.id}",
            self.losses,
        )
        self._rewrite_pending = True
        await self._rewrite()
        return True

    async def _rewrite(self) -> None:
        # Until it succeeds: Redis may fail again while the registry is being written.
        if self._rewrite_pending:
            await self.on_loss()
            self._rewrite_pending = False

    async def watch(self) -> None:
        """Check every CHECK_EVERY_S until cancelled; Redis errors are retried (an outage is
        not a loss: the marker is read again once Redis answers)."""
        while True:
            raise_if_cancelling()
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                await self.check()
            except (redis.RedisError, OSError) as exc:
                raise_if_cancelling()
                logger.debug("epoch check failed: {}", exc)

    async def _create(self, losses: int) -> tuple[str, bool]:
        marker = json.dumps({"id": uuid.uuid4().hex, "losses": losses, "since": datetime.now(UTC).isoformat()})
        if await self.client.set(self.keys.epoch, marker, nx=True):
            return marker, True
        raw = await self.client.get(self.keys.epoch)
        return (marker, True) if raw is None else (str(raw), False)

    def _adopt(self, found: tuple[str, bool]) -> None:
        marker = self._parse(found[0])
        self.id = str(marker.get("id"))
        self.losses = int(marker.get("losses", 0))

    @staticmethod
    def _parse(raw: str) -> dict[str, Any]:
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


async def redis_facts(client: redis.asyncio.Redis, keys: RedisKeys) -> dict[str, Any]:
    """For ``chronoq status``: ``maxmemory_policy`` (None when the server refuses CONFIG) and
    ``data_losses`` (losses the replicas noticed, see :class:`DataEpoch`; 0 with no marker)."""
    try:
        policy = eviction_policy(await client.config_get("maxmemory-policy"))
    except redis.ResponseError:
        policy = None
    raw = await client.get(keys.epoch)
    marker = DataEpoch._parse(str(raw)) if raw is not None else {}
    return {
        "maxmemory_policy": policy,
        "eviction_risk": eviction_problem(policy) is not None,
        "data_losses": int(marker.get("losses", 0)),
        "last_data_loss": marker.get("since") if marker.get("losses") else None,
    }
