"""How replicas share the work: a leader lease, a heartbeat per replica.

Every replica runs every job and may decide any fire: the decision itself is atomic in Redis
(:mod:`shared.fleet`), so correctness never depends on who leads. The lease only decides *when*
a replica acts: the leader when a fire is due, the others ``takeover_s`` later, as a backup.

The lease is a key holding the leader's id with a TTL of ``lease_ms``, renewed every third of
it. A leader that dies (SIGKILL) or is cut off from Redis loses it within ``lease_ms`` of its
last renewal; one that stops cleanly (SIGTERM) deletes it at once. A follower tries to take it
every third of the TTL, and also the instant the TTL it last read runs out, so a lease left by a
dead leader stands free for milliseconds, not for up to a renewal interval (which used to add
up to 0.67 s on top of the TTL). With :func:`lease_ms_for`, the TTL is 90% of ``takeover_s``:
a survivor leads within ``takeover_s`` of the leader's death, the last 10% (0.2 s by default)
being the follower's wake-up and its round trips. A leader that stalls (SIGSTOP, a long pause,
cut off from Redis) loses the lease too, and when it comes back it finds every fire it would
have published already decided by the new leader or the backups: the atomic decide is the
fence, not the lease, so it cannot publish them again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
from loguru import logger

from shared.clock import SYSTEM_CLOCK, Clock
from shared.errors import NotReplicatedError
from shared.names import RedisKeys
from shared.redis import raise_if_cancelling

if TYPE_CHECKING:
    from scheduler.metrics import ReplicaMetrics

STALE_REPLICA_S = 60
"""A replica whose heartbeat is older than this is dropped from the list by the leader."""
PRUNE_EVERY_TICKS = 15
LEASE_SHARE = 0.9
"""The lease's TTL as a share of ``takeover_s``; the rest is the margin for a follower to notice
the lapse and take the lease (timer, event loop, one round trip)."""
EXPIRY_SLACK_S = 0.002
"""A follower tries this long after the TTL it read runs out: Redis counts a key expired only
once its millisecond clock is past the deadline."""

# Acquire or renew: {1, TTL} if ARGV[1] holds the lease afterwards, else {0, what the holder's
# lease has left in ms}.
_HOLD = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, tonumber(ARGV[2])}
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(ARGV[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
"""


def lease_ms_for(takeover_s: float) -> int:
    """The leader lease's TTL for ``SCHEDULER_TAKEOVER_S``: short enough that the lease lapses
    and a follower takes it within ``takeover_s`` of the leader's last renewal."""
    return max(1, int(takeover_s * 1000 * LEASE_SHARE))


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leadership:
    """This replica's view of the lease, renewed by :meth:`run`; and its heartbeat."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: RedisKeys, owner: str, lease_ms: int, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.client = client
        self.clock = clock
        self.keys = keys
        self.owner = owner
        self.lease_ms = lease_ms
        self.started_at = clock.now().isoformat()
        self.jobs = 0
        self.outcomes: Any = {}
        self._leader = False
        self._held_by_other_ms: int | None = None
        """What the other holder's lease had left at the last tick (None: we hold it, or unknown)."""
        self._ticks = 0
        self.metrics: ReplicaMetrics | None = None
        """Set by the service: lost leases and failed renewals are counted."""
        self.on_promoted: Callable[[], None] | None = None
        """Called when this replica takes the lease (the dispatcher moves its backup fires up)."""
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    def is_leader(self) -> bool:
        return self._leader

    async def tick(self) -> bool:
        """Acquire or renew the lease and beat the heart once; False on a Redis error (a
        replica that cannot prove its lease acts as a follower)."""
        was = self._leader
        answered = False
        try:
            held, left_ms = await self._hold(keys=[self.keys.leader], args=[self.owner, self.lease_ms])
            self._leader = bool(held)
            self._held_by_other_ms = None if held else int(left_ms)
            answered = True
        except (redis.RedisError, OSError) as exc:
            self._lease_error(exc, was)
        # Promoted before the heartbeat: the fires held as backups should not wait a round trip.
        if self.metrics is not None and was and not self._leader:
            self.metrics.lease_lost.inc()
        if self._leader != was:
            logger.info("replica {} is now {}", self.owner, "the leader" if self._leader else "a follower")
            if self._leader and self.on_promoted is not None:
                self.on_promoted()
        try:
            if answered:
                await self.client.hset(self.keys.replicas, self.owner, json.dumps(self._describe()))
        except (redis.RedisError, OSError) as exc:
            raise_if_cancelling()
            logger.warning("replica heartbeat not written: {}", exc)
            if self.metrics is not None:
                self.metrics.redis_errors.labels("lease").inc()
        self._ticks += 1
        if self._leader and self._ticks % PRUNE_EVERY_TICKS == 0:
            await self._prune()
        return self._leader

    def _lease_error(self, exc: BaseException, was: bool) -> None:
        raise_if_cancelling()
        self._leader = False
        self._held_by_other_ms = None
        # A write its replicas did not confirm may be discarded (a failover): no leader on
        # its strength. Replicas missing is reported once (shared.durability), so say it once.
        quiet = isinstance(exc, NotReplicatedError) and not was
        (logger.debug if quiet else logger.warning)("leader lease not renewed: {}", exc)
        if self.metrics is not None:
            self.metrics.redis_errors.labels("lease").inc()

    def next_tick_s(self) -> float:
        """Seconds until the next :meth:`tick`: a third of the lease, or sooner for a follower
        whose leader's lease runs out before then (it tries the instant the lease is free)."""
        every_s = self.lease_ms / 3000
        if self._leader or self._held_by_other_ms is None or self._held_by_other_ms < 0:
            return every_s
        return min(every_s, self._held_by_other_ms / 1000 + EXPIRY_SLACK_S)

    async def _prune(self) -> None:
        """Forget replicas that stopped beating (killed ones never say goodbye)."""
        try:
            now_ms = int(self.clock.time() * 1000)
            for owner, raw in (await self.client.hgetall(self.keys.replicas)).items():
                if now_ms - int(json.loads(raw).get("heartbeat_ms", 0)) > STALE_REPLICA_S * 1000:
                    await self.client.hdel(self.keys.replicas, owner)
                    logger.info("replica {} stopped beating; removed from the replica list", owner)
        except (redis.RedisError, OSError, ValueError) as exc:
            raise_if_cancelling()
            logger.warning("pruning the replica list failed: {}", exc)

    def _describe(self) -> dict[str, Any]:
        return {
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "heartbeat_ms": int(self.clock.time() * 1000),
            "role": "leader" if self._leader else "follower",
            "jobs": self.jobs,
            "outcomes": dict(self.outcomes),
        }

    async def run(self) -> None:
        """Renew every third of the lease, forever (cancel to stop); a follower also tries the
        instant its leader's lease runs out (:meth:`next_tick_s`)."""
        while True:
            raise_if_cancelling()
            await self.tick()
            await asyncio.sleep(self.next_tick_s())

    async def release(self) -> None:
        """Give up the lease (a follower takes it at its next renewal) and leave the replica list."""
        try:
            await self._release(keys=[self.keys.leader], args=[self.owner])
            await self.client.hdel(self.keys.replicas, self.owner)
        except (redis.RedisError, OSError) as exc:
            raise_if_cancelling()
            logger.warning("could not release the leader lease: {}", exc)
        self._leader = False
