"""What the scheduler shares with its metrics server process (:mod:`scheduler.metricsd`), in files.

The scrape runs in a child process so that its CPU is not taken under the scheduler's GIL; what
only the scheduler knows reaches the child through one directory, never pickled:

- ``state.bin``: a small ``mmap``'d block of float64 fields. The scheduler's event loop stamps
  its heartbeat (``time.monotonic()``, the same clock in every process) every
  ``HEARTBEAT_S``, with the role, the job count and the shutting-down flag; the child's
  ``/healthz`` and ``/readyz`` read them, so a wedged loop shows even though the child answers.
  The child asks for fresh job data by raising ``wanted``; the loop answers by writing the two
  files below and setting ``done``.
- ``jobs.json``: the job list as the info labels need it (id, task, trigger kind and text, time
  zone, queue, overlap, source) and each queue's broker lists, rewritten only when the job list
  changed (a new ``gen``).
- ``next.bin``: each job's next nominal fire (epoch seconds, NaN for none) in ``jobs.json``'s
  order, packed: a uint64 ``gen`` then float64s. Written at most once per request, and the
  child asks at most once per ``FRESH_S``.
- ``prom/``: ``prometheus_client``'s multiprocess files of the replica's own counters,
  histograms and gauges (``PROMETHEUS_MULTIPROC_DIR``), read by its ``MultiProcessCollector``.

Each file is replaced whole (write to a temporary name, ``os.replace``): a reader sees the old
or the new one, never half of one.
"""

from __future__ import annotations

import json
import mmap
import operator
import os
import struct
from array import array
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

BEAT, LEADER, JOBS, STOPPING, ATTACHED, WANTED, DONE, REFRESHED = range(8)
SIZE = 8 * 8
NAN = float("nan")
FRESH_S = 1.0
"""Job data younger than this serves a scrape as it is; older, the child asks for new data."""


class JobRow(NamedTuple):
    """One job as ``/metrics`` shows it: the labels of ``chronoq_job_info``, in order."""

    id: str
    task: str
    kind: str
    schedule: str
    timezone: str
    queue: str
    overlap: str
    source: str


class StateBlock:
    """The ``state.bin`` fields, by index (``BEAT``...), mapped shared by both processes."""

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:
            path.write_bytes(bytes(SIZE))
        with path.open("r+b") as file:
            self._map = mmap.mmap(file.fileno(), SIZE)

    def get(self, field: int) -> float:
        return float(struct.unpack_from("<d", self._map, 8 * field)[0])

    def set(self, field: int, value: float) -> None:
        struct.pack_into("<d", self._map, 8 * field, value)  # one aligned 8-byte store: never torn

    def close(self) -> None:
        self._map.close()


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class StateWriter:
    """The scheduler's side: the heartbeat fields, and job data when the child asks."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.block = StateBlock(directory / "state.bin", create=True)
        self.gen = 0
        self._jobs: list[Any] = []
        self._ids: list[str] = []
        self._rows: dict[str, tuple[Any, list[str]]] = {}
        self._fires: list[datetime | None] = []
        self._times = array("d")
        self._fires_gen = -1

    def wanted(self) -> bool:
        """Whether the child asked for job data since the last :meth:`write_jobs`."""
        return self.block.get(WANTED) > self.block.get(DONE)

    def write_jobs(
        self,
        jobs: Sequence[Any],
        row: Any,
        next_fires: Mapping[str, datetime | None],
        queue_keys: Callable[[Sequence[Any]], Mapping[str, list[str]]],
        now_mono: float,
    ) -> None:
        """Answer a request: ``jobs.json`` if the job list changed (``row(spec)`` gives a
        spec's labels, worked out again only for a new spec object; ``queue_keys(jobs)`` the broker
        lists of their queues), then ``next.bin``."""
        wanted = self.block.get(WANTED)
        if len(jobs) != len(self._jobs) or not all(map(operator.is_, jobs, self._jobs)):
            known, rows = self._rows, {}
            for spec in jobs:
                entry = known.get(spec.id)
                rows[spec.id] = entry if entry is not None and entry[0] is spec else (spec, list(row(spec)))
            self._rows, self._jobs, self._ids = rows, list(jobs), [spec.id for spec in jobs]
            self.gen += 1
            doc = {"gen": self.gen, "rows": [entry[1] for entry in rows.values()], "queue_keys": dict(queue_keys(jobs))}
            _replace(self.dir / "jobs.json", json.dumps(doc, separators=(",", ":")).encode())
        times = self._next_times(list(map(next_fires.get, self._ids)))
        _replace(self.dir / "next.bin", struct.pack("<Q", self.gen) + times.tobytes())
        self.block.set(REFRESHED, now_mono)
        self.block.set(DONE, wanted)

    def _next_times(self, fires: list[datetime | None]) -> array[float]:
        """``fires`` as epoch seconds; ``timestamp()`` (microseconds each, with a time zone) only
        for the fires that are not the very objects of the last call (APScheduler replaces a
        job's ``next_run_time`` when it fires: about a tenth of the jobs between two scrapes)."""
        before, times = self._fires, self._times
        if len(before) != len(fires) or self._fires_gen != self.gen:
            times = array("d", [NAN if at is None else at.timestamp() for at in fires])
        else:
            for i, same in enumerate(map(operator.is_, fires, before)):
                if not same:
                    at = fires[i]
                    times[i] = NAN if at is None else at.timestamp()
        self._fires, self._times, self._fires_gen = fires, times, self.gen
        return times


class StateReader:
    """The child's side: the job rows and next fires of the last data the scheduler wrote."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.block = StateBlock(directory / "state.bin")
        self.gen = -1
        self.rows: list[JobRow] = []
        self.queue_keys: dict[str, list[str]] = {}
        self.next_fires: dict[str, float | None] = {}
        self._next_stamp = 0.0

    def request(self) -> float:
        """Ask the scheduler for new job data; the value ``done`` reaches once answered."""
        wanted = self.block.get(WANTED) + 1
        self.block.set(WANTED, wanted)
        return wanted

    def load(self) -> None:
        """Read what the scheduler wrote last (files not changed since are not read again)."""
        stamp = self.block.get(REFRESHED)  # set after the files are written
        if stamp == self._next_stamp:
            return
        try:
            data = (self.dir / "next.bin").read_bytes()
        except FileNotFoundError:
            return
        (gen,) = struct.unpack_from("<Q", data)
        if gen != self.gen:
            doc = json.loads((self.dir / "jobs.json").read_bytes())
            if doc["gen"] != gen:  # jobs.json already replaced by a newer one: next time
                return
            self.rows = [JobRow(*row) for row in doc["rows"]]
            self.queue_keys = doc["queue_keys"]
            self.gen = gen
        times = array("d")
        times.frombytes(data[8:])
        self.next_fires = {row.id: (None if t != t else t) for row, t in zip(self.rows, times, strict=True)}
        self._next_stamp = stamp
