"""One replica's metrics, probes and HTTP server, wired to the running service.

:class:`Observability` is built by ``serve()`` before anything else: it starts the metrics
server process (:mod:`scheduler.metricsd`, owned through :mod:`scheduler.metricschild`) and
waits until it listens, so a port in use ends the process before it touches Redis or starts a
worker. The server answers at once (``/healthz`` during start-up, ``/readyz`` says "starting")
and is attached to the service once its jobs are loaded.

The heartbeat coroutine is the liveness signal: it runs on the scheduler's event loop and
stamps a monotonic time every ``HEARTBEAT_S`` into the state shared with the server
(:mod:`scheduler.replicastate`), with the role and the job count; how late it wakes is the
event-loop lag. When the server asked for job data, the same tick writes it (the job list only
when it changed; the next fire times packed): on the loop, about a millisecond at 10,000 jobs,
at most once a second. The replica's counters, histograms and gauges live in
``prometheus_client``'s multiprocess files, which the server reads.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from scheduler.fleetmetrics import job_row
from scheduler.metrics import ReplicaMetrics, share_values
from scheduler.metricschild import MetricsChild
from scheduler.probes import Probes
from scheduler.replicastate import ATTACHED, BEAT, JOBS, LEADER, STOPPING, StateWriter
from shared.settings import AppSettings

if TYPE_CHECKING:
    from scheduler.specs import JobSpec

HEARTBEAT_S = 0.25


class Observability:
    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.probes = Probes(settings.http.liveness_timeout_s)
        self.child: MetricsChild | None = None
        self.state: StateWriter | None = None
        self.dir: Path | None = None
        if settings.http.port:
            self.dir = Path(tempfile.mkdtemp(prefix="chronoq-metrics-"))
            (self.dir / "prom").mkdir()
            try:
                self.state = StateWriter(self.dir)
                self.state.block.set(BEAT, time.monotonic())  # alive from the start, as the loop is
                self.child = MetricsChild(settings, self.dir)
                self.child.start()  # binds HTTP_PORT, or raises ConfigError: exit 78
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            share_values(self.dir / "prom")
        self.metrics = ReplicaMetrics()
        self._jobs: Callable[[], Sequence[JobSpec]] = list
        self._next_fires: Callable[[], dict[str, datetime | None]] = dict
        self._queue_keys: Callable[[str], list[str]] = lambda _name: []
        self._role: Callable[[], str] | None = None
        self._base_queues: list[str] = []
        self._leader = -1.0

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
        self._jobs, self._next_fires, self._queue_keys, self._role = jobs, next_fires, queue_keys, role
        self._base_queues = list(queues)
        self._share(time.monotonic())
        if self.child is not None and self.state is not None:
            self.state.block.set(ATTACHED, 1.0)
            self.child.attach(settings, owner, list(queues))

    def stopping(self) -> None:
        """Shutting down: ``/readyz`` says so from now on."""
        self.probes.stopping = True
        if self.state is not None:
            self.state.block.set(STOPPING, 1.0)

    def stop(self) -> None:
        self.stopping()
        if self.child is not None:
            self.child.stop()
        if self.state is not None:
            self.state.block.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _queues(self, jobs: Sequence[JobSpec]) -> dict[str, list[str]]:
        """The broker lists of the jobs' queues (only when the job list changed)."""
        queues = {}
        for queue in sorted({spec.queue for spec in jobs} | set(self._base_queues)):
            try:
                queues[queue] = self._queue_keys(queue)
            except (ValueError, KeyError) as exc:  # a queue the encoder cannot route
                logger.warning("metrics: no length for queue {}: {}", queue, exc)
        return queues

    def _share(self, now: float) -> None:
        """One heartbeat's writes to the shared state (and the job data, when asked)."""
        role = self._role
        leader = 1.0 if role is not None and role() == "leader" else 0.0
        if leader != self._leader:
            self.metrics.leader.set(leader)
            self._leader = leader
        state = self.state
        if state is None:
            return
        block = state.block
        block.set(BEAT, now)
        block.set(LEADER, leader)
        if self.child is not None:
            self.child.check()
        if role is None:
            return
        jobs = self._jobs()  # a list of the registered specs: tens of microseconds at 10,000
        block.set(JOBS, len(jobs))
        if state.wanted():
            state.write_jobs(jobs, job_row, self._next_fires(), self._queues, now)

    async def heartbeat(self) -> None:
        """Stamp liveness every HEARTBEAT_S and observe how late the loop woke us (forever)."""
        loop = asyncio.get_running_loop()
        while True:
            self.probes.beat = now = time.monotonic()
            self._share(now)
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
