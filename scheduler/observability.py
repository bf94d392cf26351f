"""One replica's metrics, probes and HTTP server, wired to the running service.

:class:`Observability` is built by ``serve()`` before anything else (so a port in use ends the
process before it touches Redis or starts a worker), starts answering at once (``/healthz``
during start-up, ``/readyz`` says "starting"), and is attached to the service once its jobs are
loaded. The heartbeat coroutine is the liveness signal: it runs on the scheduler's event loop
and stamps a monotonic time every ``HEARTBEAT_S``; how late it wakes is the event-loop lag.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from loguru import logger

from scheduler.exposition import MetricsPage
from scheduler.fleetmetrics import FleetCollector
from scheduler.metrics import ReplicaMetrics
from scheduler.probes import Probes, ProbeServer, ReplicaView
from shared.names import RedisKeys
from shared.redis import create_redis
from shared.settings import AppSettings

if TYPE_CHECKING:
    import redis

    from scheduler.specs import JobSpec

HEARTBEAT_S = 0.25
FLEET_READ_TIMEOUT_S = 2.0
"""Socket timeout of the metrics server's own Redis client: a scrape during a Redis stall
answers (without fleet data) well within Prometheus' default 10 s scrape timeout."""


class Observability:
    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.metrics = ReplicaMetrics()
        self.probes = Probes(settings.http.liveness_timeout_s)
        self.page = MetricsPage(self.metrics.registry)
        self.server = ProbeServer(settings.http, self.page, self.probes) if settings.http.port else None
        self.collector: FleetCollector | None = None
        self._client: redis.Redis | None = None

    def start(self) -> None:
        if self.server is not None:
            self.server.start()

    def attach(
        self,
        settings: AppSettings,
        *,
        owner: str,
        role: Callable[[], str],
        jobs: Callable[[], Sequence[JobSpec]],
        next_fires: Callable[[], dict[str, datetime | None]],
        queue_keys: Callable[[str], list[str]],
        queues: Sequence[str],
    ) -> None:
        """The service is up (``settings`` now name the Redis actually used): readiness and
        fleet metrics from here on."""
        timeout = min(settings.redis.socket_timeout_s, FLEET_READ_TIMEOUT_S)
        redis_settings = settings.redis.model_copy(
            update={"socket_timeout_s": timeout, "socket_connect_timeout_s": timeout}
        )
        self._client = client = create_redis(redis_settings)
        http = settings.http
        self.collector = FleetCollector(
            client,
            RedisKeys(settings.redis.key_prefix),
            jobs=jobs,
            next_fires=next_fires,
            queue_keys=queue_keys,
            queues=queues,
            label_limit=http.job_label_limit,
            queue_limit=http.queue_label_limit,
            cache_s=http.fleet_cache_s,
        )
        self.metrics.registry.register(self.collector)
        self.page.collector = self.collector
        self.probes._ping = client.ping
        self.metrics.leader.set_function(lambda: 1.0 if role() == "leader" else 0.0)
        self.probes.replica = ReplicaView(role=role, jobs=lambda: len(jobs()), owner=owner)

    def stop(self) -> None:
        self.probes.stopping = True
        if self.server is not None:
            self.server.stop()
        if self._client is not None:
            self._client.close()

    async def heartbeat(self) -> None:
        """Stamp liveness every HEARTBEAT_S and observe how late the loop woke us (forever)."""
        loop = asyncio.get_running_loop()
        while True:
            self.probes.beat = time.monotonic()
            asked = loop.time() + HEARTBEAT_S
            await asyncio.sleep(HEARTBEAT_S)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - asked))

    def install_test_hook(self, loop: asyncio.AbstractEventLoop) -> bool:
        """With ``HTTP_TEST_BLOCK_LOOP_S`` set (a test setting, off by default), SIGUSR2 blocks
        the event loop for that long: how the liveness test wedges a real replica."""
        block_s = self.settings.http.test_block_loop_s
        if not block_s:
            return False

        def block() -> None:
            logger.warning("test hook: blocking the event loop for {}s (HTTP_TEST_BLOCK_LOOP_S)", block_s)
            time.sleep(block_s)  # the point: a wedged loop
            logger.warning("test hook: event loop unblocked")

        loop.add_signal_handler(signal.SIGUSR2, block)
        logger.warning("HTTP_TEST_BLOCK_LOOP_S={}: SIGUSR2 blocks the event loop (a test hook; unset it)", block_s)
        return True
