"""Keeping a running fire's run lease and slot while its task still runs, in every pool.

A run lease (and the fire's slot of ``max_instances``) is taken for the time limit plus
``SCHEDULER_SLOT_MARGIN_S``, so that a worker that dies gives the slot back on its own. A task
that runs longer than that while its process lives (the threads and solo pools enforce no time
limit; a task with only a soft limit that ignores it) would lose its slot, and the next fire of
a ``max_instances: 1`` job would run beside it. :class:`LeaseKeeper` is one daemon thread per
process that renews each lease the process holds, every third of its length, until the
attempt's outcome is recorded; a task past its time limit is reported once, at warning level.
If the process dies, nothing renews and the lease lapses as before.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from loguru import logger

from shared.fleet import FireLedger

TICK_S = 0.5


@dataclass
class Held:
    """One attempt whose lease is being kept."""

    job_id: str
    scheduled_at: str
    task_id: str
    runner: str
    attempt: int
    lease_ms: int
    time_limit_s: float
    started: float = field(default_factory=time.monotonic)
    renewed: float = field(default_factory=time.monotonic)
    warned: bool = False


class LeaseKeeper:
    """Renews the run leases of this process's running attempts (thread-safe, fork-aware:
    a pool process starts its own thread on its first :meth:`hold`)."""

    def __init__(self, ledger: Callable[[], FireLedger], pool: str) -> None:
        self._ledger = ledger
        self.pool = pool
        self._pid = -1
        self._lock = threading.Lock()
        self._held: dict[Any, Held] = {}
        self._wake = threading.Event()

    def hold(self, key: Any, held: Held) -> None:
        """Keep ``held``'s lease until :meth:`drop` with the same ``key``."""
        with self._lock:
            if self._pid != os.getpid():  # a forked pool process: the parent's thread is not here
                self._pid, self._held, self._wake = os.getpid(), {}, threading.Event()
                threading.Thread(target=self._run, args=(self._wake,), name="chronoq-lease", daemon=True).start()
            self._held[key] = held

    def drop(self, key: Any) -> None:
        with self._lock:
            self._held.pop(key, None)

    def stop(self) -> None:
        self._wake.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            now = time.monotonic()
            with self._lock:
                due = [(k, h) for k, h in self._held.items() if now - h.renewed >= h.lease_ms / 3000]
            for key, held in due:
                self._renew(key, held, now)

    def _renew(self, key: Any, held: Held, now: float) -> None:
        try:
            kept = self._ledger().renew(
                held.job_id, held.scheduled_at, held.task_id, held.runner, held.attempt, held.lease_ms
            )
        except redis.RedisError as exc:
            # Retried on the next tick; the lease still has two thirds of its length to run.
            logger.warning("run lease not renewed job_id={}: {}", held.job_id, type(exc).__name__)
            return
        held.renewed = now
        if not kept:
            self.drop(key)
            return
        running_s = now - held.started
        if held.time_limit_s and running_s > held.time_limit_s and not held.warned:
            held.warned = True
            logger.warning(
                "fire over its time limit job_id={} task_id={} time_limit_s={:g} running_s={:.0f} pool={}: "
                "the pool cannot stop it; its slot stays held while it runs",
                held.job_id,
                held.task_id,
                held.time_limit_s,
                running_s,
                self.pool,
            )
