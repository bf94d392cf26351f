"""The per-job series of ``/metrics``: the same families two ways, and a cache between scrapes.

At 10,000 jobs the per-job families hold about 80,000 samples; ``prometheus_client`` formats
each one afresh on every scrape (about 5 us a sample: 400 ms of CPU). Between two scrapes a
second apart only the jobs that fired change (about a tenth at 10,000 jobs every 10 s), so
:class:`JobSeriesText` keeps each family's sample lines and formats again only the values that
changed, with ``prometheus_client``'s own helpers (``floatToGoString`` and the label value
escaping of its exposition); the ``# HELP``/``# TYPE`` lines come from ``prometheus_client``'s
encoder itself. :func:`job_families` builds the very same families as ``prometheus_client``
metric objects: what a plain ``generate_latest`` of the fleet collector yields, the reference
the tests hold the text to, byte for byte.

The cache holds one line per labelled job and family, rebuilt for the current jobs whenever the
job list changes: it never holds more jobs than ``HTTP_JOB_LABEL_LIMIT``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import ALLOWUTF8, _escape
from prometheus_client.utils import floatToGoString as _float_text


def go_float(value: float) -> str:
    """A sample value as prometheus_client writes it (its ``floatToGoString``)."""
    return _float_text(value)  # type: ignore[no-untyped-call,no-any-return]


YIELD_S = 0.0002
"""How long a scrape's thread steps aside for the event loop's between pieces of work. A
``sleep(0)`` alone lets go of the GIL but takes it straight back, most of the time before the
waiting loop thread wakes up; the loop then waits out the 5 ms switch interval instead."""


CHUNK = 1000
"""Jobs worked on between two :func:`offer_gil` (well under a millisecond of work)."""


def offer_gil() -> None:
    """Let a thread waiting for the GIL (the event loop's) run now, not in 5 ms."""
    time.sleep(YIELD_S)


OTHER = "_other"
"""The ``job`` label of the aggregate past ``HTTP_JOB_LABEL_LIMIT``."""
INFO = "chronoq_job_info"
INFO_LABELS = ("job", "task", "trigger", "schedule", "timezone", "queue", "overlap", "source")
FIRES = "chronoq_job_fires"
GAUGES = (
    ("chronoq_job_next_fire_timestamp_seconds", "Next nominal fire time of the job on this replica"),
    ("chronoq_job_last_fire_timestamp_seconds", "Nominal time of the job's last dispatched fire"),
    ("chronoq_job_last_success_timestamp_seconds", "When a run of the job last succeeded"),
    ("chronoq_job_paused", "1 while the job is paused"),
    ("chronoq_job_inflight", "The job's max_instances slots in use (queued or running)"),
    ("chronoq_job_buffered", "1 while a buffer_one fire waits for a slot"),
)
UNLABELLED = "chronoq_jobs_unlabelled"
Encoder = Callable[[Any], bytes]


@dataclass
class JobColumns:
    """The per-job values of one scrape, one list entry per labelled job (in label order).

    ``info`` holds each job's label values in :data:`INFO_LABELS` order; a gauge value of None
    means no sample for that job; ``fires`` holds (outcome, count) pairs in outcome order.
    ``other_*`` is the ``job="_other"`` aggregate (``unlabelled`` jobs; next fire: the earliest).
    """

    info: list[tuple[str, ...]] = field(default_factory=list)
    gauges: dict[str, list[float | None]] = field(default_factory=dict)
    fires: list[tuple[tuple[str, int], ...]] = field(default_factory=list)
    unlabelled: int = 0
    other_next_fire: float | None = None
    other_paused: int = 0
    other_buffered: int = 0
    ids: list[str] | None = None
    """The jobs (the first of each ``info``), when the caller has them at hand."""

    @property
    def jobs(self) -> list[str]:
        return self.ids if self.ids is not None else [labels[0] for labels in self.info]

    def other_values(self) -> dict[str, float | None]:
        if not self.unlabelled:
            return {}
        return {
            "chronoq_job_next_fire_timestamp_seconds": self.other_next_fire,
            "chronoq_job_paused": self.other_paused,
            "chronoq_job_buffered": self.other_buffered,
        }


def job_families(columns: JobColumns) -> list[Metric]:
    """The per-job families as ``prometheus_client`` objects (the reference rendering)."""
    info = GaugeMetricFamily(INFO, "Each job's definition, as labels (always 1)", labels=list(INFO_LABELS))
    for labels in columns.info:
        info.add_metric(list(labels), 1)
    families: list[Metric] = [info]
    jobs, other = columns.jobs, columns.other_values()
    for name, text in GAUGES:
        gauge = GaugeMetricFamily(name, text, labels=["job"])
        for job, value in zip(jobs, columns.gauges.get(name, ()), strict=True):
            if value is not None:
                gauge.add_metric([job], value)
        if other.get(name) is not None:
            gauge.add_metric([OTHER], other[name])  # type: ignore[arg-type]
        families.append(gauge)
    fires = CounterMetricFamily(FIRES, "Fires of the job by outcome", labels=["job", "outcome"])
    for job, counts in zip(jobs, columns.fires, strict=True):
        for outcome, count in counts:
            fires.add_metric([job, outcome], count)
    families.append(fires)
    families.append(
        GaugeMetricFamily(
            UNLABELLED, f'Jobs past HTTP_JOB_LABEL_LIMIT, summed up as job="{OTHER}"', value=columns.unlabelled
        )
    )
    return families


class Families:
    """Metric objects as a collector (what an encoder of ``prometheus_client`` iterates)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def label_value(value: str) -> str:
    """A label value as both of prometheus_client's encoders write it (backslash, newline and
    double quote escaped; ``_escape`` is their own helper)."""
    return _escape(value, ALLOWUTF8, lambda _c, _i: True)  # type: ignore[no-untyped-call]


def _gauge_line(name: str) -> Callable[[str, Any], str]:
    def line(job_label: str, value: Any) -> str:
        return "" if value is None else f"{name}{{{job_label}}} {go_float(value)}\n"

    return line


def _fires_line(job_label: str, counts: tuple[tuple[str, int], ...]) -> str:
    return "".join(f'{FIRES}_total{{{job_label},outcome="{label_value(o)}"}} {go_float(c)}\n' for o, c in counts)


class _Family:
    """One family's sample lines for the labelled jobs, kept between scrapes."""

    def __init__(self, line: Callable[[str, Any], str]) -> None:
        self.line = line
        self.values: Sequence[Any] = []
        self.lines: list[str] = []
        self.text = ""
        self.jobs: list[str] = []
        self.formatted = 0

    def update(self, jobs: list[str], job_labels: list[str], values: Sequence[Any]) -> str:
        """The family's lines for ``values`` (one per job; kept, not copied: do not change it)."""
        if values is self.values and jobs is self.jobs:  # the same snapshot's column
            return self.text
        if jobs == self.jobs and len(values) == len(self.values):
            if values == self.values:
                self.values, self.jobs = values, jobs
                return self.text
            lines, line, before = self.lines, self.line, self.values
            for start in range(0, len(values), CHUNK):  # slices compare in C; a changed one by value
                end = start + CHUNK
                if values[start:end] != before[start:end]:
                    for i in range(start, min(end, len(values))):
                        if values[i] != before[i]:  # 1 == 1.0 == True print alike too ("1.0")
                            lines[i] = line(job_labels[i], values[i])
                            self.formatted += 1
                    offer_gil()
            self.jobs = jobs
        else:
            self.lines = []
            for start in range(0, len(values), CHUNK):
                end = start + CHUNK
                self.lines += map(self.line, job_labels[start:end], values[start:end])
                offer_gil()
            self.jobs = jobs
            self.formatted += len(values)
        self.values = values
        self.text = "".join(self.lines)
        return self.text


class JobSeriesText:
    """The per-job families as exposition text, formatting again only what changed.

    Thread-safe (concurrent scrapes take turns). ``render`` lets go of the GIL between
    families, so the event loop's thread never waits a whole scrape.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[str] = []
        self._job_labels: list[str] = []
        self._families: dict[str, _Family] = {INFO: _Family(self._info_line)}
        self._families.update({name: _Family(_gauge_line(name)) for name, _ in GAUGES})
        self._families[FIRES] = _Family(_fires_line)  # the order of job_families
        self._headers: dict[tuple[object, ...], dict[str, str]] = {}

    @property
    def formatted(self) -> int:
        """Per-job values formatted so far (tests check that unchanged ones are not formatted again)."""
        return sum(family.formatted for family in self._families.values())

    @staticmethod
    def _info_line(job_label: str, labels: tuple[str, ...]) -> str:
        pairs = sorted(zip(INFO_LABELS, labels, strict=True))
        body = ",".join(f'{k}="{label_value(v)}"' for k, v in pairs)
        return f"{INFO}{{{body}}} 1.0\n"

    def cached_jobs(self) -> int:
        """The most jobs any family holds lines for (bounded by the labelled jobs)."""
        return max(len(family.lines) for family in self._families.values())

    def render(self, columns: JobColumns, encoder: Encoder, names: set[str] | None = None) -> str:
        """:meth:`pieces`, joined."""
        return "".join(self.pieces(columns, encoder, names))

    def pieces(self, columns: JobColumns, encoder: Encoder, names: set[str] | None = None) -> list[str]:
        """The families of :func:`job_families` as ``encoder`` writes them, without its
        ``# EOF``; with ``names`` (``name[]`` of the request), only families with a sample of
        those names, like ``prometheus_client``'s ``restricted_registry``."""
        with self._lock:
            jobs = columns.jobs
            if jobs != self._jobs:
                self._jobs = jobs
                self._job_labels = [f'job="{label_value(job)}"' for job in jobs]
            headers = self._headers_for(encoder)
            other = columns.other_values()
            other_label = f'job="{OTHER}"'
            values: dict[str, Sequence[Any]] = {INFO: columns.info, FIRES: columns.fires, **columns.gauges}
            out = []
            for name, family in self._families.items():
                if names is not None and (name if name != FIRES else f"{FIRES}_total") not in names:
                    continue
                column = values.get(name)
                text = family.update(jobs, self._job_labels, column if column is not None else [None] * len(jobs))
                tail = family.line(other_label, other[name]) if name in other else ""
                if names is not None and not (text or tail):
                    continue
                out += [headers[name], text, tail]
                offer_gil()  # between families: the event loop's turn
            if names is None or UNLABELLED in names:
                out.append(headers[UNLABELLED] + f"{UNLABELLED} {go_float(columns.unlabelled)}\n")
            return out

    def _headers_for(self, encoder: Encoder) -> dict[str, str]:
        """Each family's ``# HELP`` and ``# TYPE`` lines, as ``encoder`` itself writes them."""
        # choose_encoder builds a new partial per request: key on what it binds
        key = (getattr(encoder, "func", encoder), *sorted(getattr(encoder, "keywords", {}).items()))
        if key not in self._headers:
            if len(self._headers) >= 16:  # the Accept header picks the version: bounded by us
                self._headers.clear()
            headers = {}
            for family in job_families(JobColumns()):
                lines = encoder(Families([family])).decode().splitlines(keepends=True)
                headers[family.name] = "".join(line for line in lines if line.startswith("# ") and line != "# EOF\n")
            self._headers[key] = headers
        return self._headers[key]
