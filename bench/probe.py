"""What the harness observes: arrivals on the bench queue, and the CPU and memory of processes.

:class:`QueueProbe` is the only consumer of the queue. It pops messages as they arrive and stamps
each with the wall-clock time of the pop that returned it (an upper bound on when it landed).
Decoding is deferred while the list still holds a backlog, so a burst is drained at the speed of
``RPOP`` and its timestamps are not inflated by JSON parsing.

:class:`TreeSampler` samples a process and its descendants every ``interval_s``: the peak of their
summed RSS, and their CPU time (user + system, including reaped children) on demand.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import threading
import time
from array import array
from datetime import datetime

import psutil
import redis

from bench.workloads import TASK

POP_BATCH = 1000


class QueueProbe:
    """Consume ``queue`` on ``url`` in a thread from :meth:`start` to :meth:`stop`.

    Arrivals are three parallel arrays: ``times`` (epoch s), ``indexes`` (the task's first
    argument) and ``scheduled`` (epoch s of a ``scheduled_at`` header, NaN without one).
    Messages of another task, or that do not decode, are counted in ``foreign``.
    """

    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.times = array("d")
        self.indexes = array("q")
        self.scheduled = array("d")
        self.foreign = 0
        self._client = redis.Redis.from_url(url, socket_timeout=10)
        self._pending: list[tuple[float, list[bytes]]] = []
        self._popped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-probe", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> QueueProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop consuming (after at most one blocking pop) and decode what is left."""
        self._stop.set()
        self._thread.join(10)
        self._decode()
        self._client.close()
        if self._error is not None:
            raise RuntimeError(f"queue probe failed: {self._error!r}") from self._error

    @property
    def popped(self) -> int:
        """Messages popped so far (decoded or not)."""
        return self._popped

    def first_time(self, index: int) -> float | None:
        """The first arrival time of job ``index`` among the decoded arrivals, or None."""
        for when, got in zip(self.times, self.indexes, strict=True):
            if got == index:
                return when
        return None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                got = self._client.brpop([self.queue], timeout=0.1)
                if got is None:
                    self._decode()
                    continue
                self._keep(time.time(), [got[1]])  # type: ignore[list-item]  # a bytes client
                while True:
                    more = self._client.rpop(self.queue, POP_BATCH) or []
                    if more:
                        self._keep(time.time(), list(more))  # type: ignore[arg-type]
                    if len(more) < POP_BATCH:
                        break
                self._decode()  # the list was empty a moment ago: parsing now delays no arrival much
        except BaseException as exc:  # reported by stop()
            self._error = exc

    def _keep(self, when: float, raws: list[bytes]) -> None:
        self._pending.append((when, raws))
        self._popped += len(raws)

    def _decode(self) -> None:
        pending, self._pending = self._pending, []
        for when, raws in pending:
            for raw in raws:
                decoded = decode_message(raw)
                if decoded is None:
                    self.foreign += 1
                    continue
                self.times.append(when)
                self.indexes.append(decoded[0])
                self.scheduled.append(decoded[1])


def decode_message(raw: bytes) -> tuple[int, float] | None:
    """``(index, scheduled_at epoch s or NaN)`` of a Celery protocol-2 bench message, else None."""
    try:
        envelope = json.loads(raw)
        headers = envelope.get("headers") or {}
        if headers.get("task") != TASK:
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        index = int(json.loads(body)[0][0])
        scheduled = headers.get("scheduled_at")
        return index, (datetime.fromisoformat(scheduled).timestamp() if scheduled else math.nan)
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class TreeSampler:
    """Sample the summed RSS of ``pid`` and its descendants every ``interval_s``, in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss_bytes = 0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def reset_peak(self) -> None:
        self.peak_rss_bytes = 0

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the process, its reaped and its live children."""
        try:
            total = _cpu_s(self.process, with_reaped=True)
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += _cpu_s(child, with_reaped=False)
            return total
        except psutil.Error:
            return math.nan

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                rss = self.process.memory_info().rss
                for child in self.process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
            except psutil.Error:
                return
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)


def _cpu_s(process: psutil.Process, with_reaped: bool) -> float:
    times = process.cpu_times()
    total = times.user + times.system
    if with_reaped:
        total += times.children_user + times.children_system
    return float(total)
