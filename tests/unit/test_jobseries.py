"""The per-job series' own text (kept between scrapes) against prometheus_client's, byte for byte."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from scheduler.jobseries import GAUGES, INFO, OTHER, Families, JobColumns, JobSeriesText, job_families

NEXT, LAST, SUCCESS, PAUSED, INFLIGHT, BUFFERED = (name for name, _ in GAUGES)

ACCEPTS = [
    "",  # text format 0.0.4
    "text/plain; version=1.0.0",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    # what a Prometheus server sends
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
]
NASTY = ['say "hi"', "back\\slash", "two\nlines", "ünïcødé ✓ 時間", 'all \\ " \n of them', "", "plain"]


def columns(jobs: list[str], shift: float = 0.0, counts: int = 0) -> JobColumns:
    """Per-job values of every kind: timestamps, NaN, infinities, ints, missing samples."""
    n = len(jobs)
    specials = [math.nan, math.inf, -math.inf, 1e21, 1_700_000_000.123456, 0.1, -0.0]
    cols = JobColumns(
        info=[
            (
                job,
                f"task.{NASTY[i % len(NASTY)]}",
                "cron",
                f"0 {i % 24} * * *",
                "Europe/Zürich",
                NASTY[-i % len(NASTY)],
                "skip",
                "api",
            )
            for i, job in enumerate(jobs)
        ],
        gauges={
            NEXT: [1_900_000_000 + i + shift for i in range(n)],
            LAST: [None if i % 3 == 0 else specials[i % len(specials)] for i in range(n)],
            SUCCESS: [None if i % 2 else 1_700_000_000.5 + i for i in range(n)],
            PAUSED: [i % 2 for i in range(n)],
            INFLIGHT: [i % 4 for i in range(n)],
            BUFFERED: [int(i % 5 == 0) for i in range(n)],
        },
        fires=[tuple((o, i + counts) for o in ("dispatched", "failed")[: i % 3]) for i in range(n)],
    )
    return cols


def reference(cols: JobColumns, encoder: Callable[[CollectorRegistry], bytes]) -> str:
    text = encoder(Families(job_families(cols))).decode()  # type: ignore[arg-type]
    return text.removesuffix("# EOF\n")


JOBS = [f"job-{c}" for c in NASTY] + [f"j{i:03d}" for i in range(20)]


@pytest.mark.parametrize("accept", ACCEPTS)
def test_the_text_equals_prometheus_clients_byte_for_byte(accept: str) -> None:
    encoder, _ = choose_encoder(accept)
    text = JobSeriesText()
    first = columns(JOBS)
    assert text.render(first, encoder) == reference(first, encoder)
    assert 'job="job-say \\"hi\\""' in text.render(first, encoder)
    # Some values change, the rest stay: still the same bytes, formatting only what changed.
    later = columns(JOBS, shift=10.0)
    later.gauges[PAUSED][3] = 0 if later.gauges[PAUSED][3] else 1
    later.info[4] = (*later.info[4][:-1], "file")
    later.unlabelled, later.other_next_fire, later.other_paused = 7, math.inf, 2
    formatted = text.formatted
    assert text.render(later, encoder) == reference(later, encoder)
    assert text.formatted - formatted == len(JOBS) + 2, "the next fires, one paused flag and one info line"
    assert f'job="{OTHER}"' in text.render(later, encoder)


def test_unchanged_values_are_not_formatted_again() -> None:
    encoder, _ = choose_encoder("")
    text = JobSeriesText()
    cols = columns(JOBS)
    once = text.render(cols, encoder)
    formatted = text.formatted
    again = columns(JOBS)  # equal values, new objects
    assert text.render(again, encoder) == once
    assert text.formatted == formatted
    bumped = columns(JOBS, counts=1)  # every job with an outcome count has a new one
    assert text.render(bumped, encoder) == reference(bumped, encoder)
    assert text.formatted - formatted == sum(1 for f in bumped.fires if f)


def test_jobs_added_and_deleted_change_the_lines_and_the_cache_follows() -> None:
    encoder, _ = choose_encoder("application/openmetrics-text; version=1.0.0")
    text = JobSeriesText()
    text.render(columns(JOBS), encoder)
    assert text.cached_jobs() == len(JOBS)
    fewer = [job for i, job in enumerate(JOBS) if i % 3]
    cols = columns(fewer)
    assert text.render(cols, encoder) == reference(cols, encoder)
    assert text.cached_jobs() == len(fewer), "deleted jobs' lines are dropped"
    assert "job-say" not in text.render(cols, encoder)
    more = [*fewer, "zz-new"]
    cols = columns(more)
    assert text.render(cols, encoder) == reference(cols, encoder)
    assert text.cached_jobs() == len(more)
    empty = JobColumns()
    assert text.render(empty, encoder) == reference(empty, encoder)
    assert text.cached_jobs() == 0


@pytest.mark.parametrize(
    "names",
    [
        ["chronoq_job_paused"],
        ["chronoq_job_fires_total", INFO],
        ["chronoq_jobs_unlabelled", "chronoq_job_last_fire_timestamp_seconds"],
        ["chronoq_job_fires"],  # not a sample name: nothing, as prometheus_client's filter
    ],
)
def test_name_filters_select_what_prometheus_clients_restricted_registry_does(names: list[str]) -> None:
    encoder, _ = choose_encoder("")
    cols = columns(JOBS)
    registry = CollectorRegistry(auto_describe=True)  # knows the collector's names, as the replica's does
    registry.register(Families(job_families(cols)))  # type: ignore[arg-type]
    expected = encoder(registry.restricted_registry(names)).decode()  # type: ignore[arg-type]
    assert JobSeriesText().render(cols, encoder, set(names)) == expected
