"""A real replica's whole /metrics page: valid in both formats (prometheus_client's parsers and
promtool), each family once, the per-job part kept between scrapes still true after jobs come
and go, and queue lengths for a queue that first appears with a job created through the API."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from scheduler.api import Client
from shared.settings import AppSettings
from tests.conftest import RedisServer, SchedulerProcess, wait_for, write_jobs

pytestmark = pytest.mark.timeout(120)

PROMTOOL = shutil.which("promtool") or "promtool"  # Debian's prometheus: scripts/test-tools.txt
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
ODD_ID = "odd:id.v-1_x"  # ids are letters, digits and . _ : - (label escaping: tests/unit/test_jobseries.py)


def fetch(replica: SchedulerProcess, accept: str = "", gzipped: bool = False) -> str:
    headers = {"Accept": accept} if accept else {}
    if gzipped:
        headers["Accept-Encoding"] = "gzip"
    request = urllib.request.Request(f"http://127.0.0.1:{replica.http_port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 (http to the replica)
        body = reply.read()
        assert reply.status == 200
        if gzipped:
            assert reply.headers["Content-Encoding"] == "gzip"
            body = gzip.decompress(body)
        return str(body.decode())


def job_label_values(text: str, family: str) -> set[str]:
    return {s.labels["job"] for f in text_string_to_metric_families(text) if f.name == family for s in f.samples}


def check_page(text: str, openmetrics: bool) -> None:
    """Parses, each family's HELP and TYPE once, and (text format) promtool agrees."""
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    families = list(parse(text))  # type: ignore[no-untyped-call]
    names = Counter(f.name for f in families)
    assert [n for n, c in names.items() if c > 1] == []
    for kind in ("HELP", "TYPE"):
        declared = Counter(re.findall(rf"^# {kind} (\S+)", text, re.MULTILINE))
        assert [n for n, c in declared.items() if c > 1] == [], kind
    assert {"chronoq_job_info", "chronoq_job_paused", "chronoq_queue_length", "process_cpu_seconds"} <= {
        f.name for f in families
    }
    if openmetrics:
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    else:
        result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_whole_page_is_valid_in_both_formats_and_follows_jobs_and_queues(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
) -> None:
    client = redis_server.client()
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [
            {"id": ODD_ID, "task": "demo.record_fire", "cron": "0 3 1 1 *"},
            {"id": "plain", "task": "demo.record_fire", "cron": "0 4 1 1 *"},
        ],
    )
    (replica,) = start_scheduler(settings, jobs, extra_env={"HTTP_FLEET_CACHE_S": "0"})
    for accept, openmetrics in (("", False), ("text/plain; version=0.0.4", False), (OPENMETRICS, True)):
        check_page(fetch(replica, accept), openmetrics)
    assert job_label_values(fetch(replica, gzipped=True), "chronoq_job_paused") == {ODD_ID, "plain"}

    # A job created at runtime on a queue the replica did not know at start: its series and
    # its queue's length appear, and go when the job is deleted.
    queue = "runtime-q"
    assert client.llen(queue) == 0
    with Client(settings, by="test") as api:
        api.create({"id": "late", "task": "demo.record_fire", "interval": 1, "queue": queue})

        def queued() -> tuple[float, int] | None:
            before = client.llen(queue)
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(fetch(replica))  # type: ignore[no-untyped-call]
                for s in f.samples
            }
            after = client.llen(queue)
            length = samples.get(("chronoq_queue_length", (("queue", queue),)))
            return (length, after) if length is not None and length >= 1 and before <= length <= after else None

        wait_for(queued, 30, f"chronoq_queue_length of {queue} to count its waiting messages (no worker runs)")
        text = fetch(replica)
        assert job_label_values(text, "chronoq_job_info") == {ODD_ID, "plain", "late"}
        check_page(text, openmetrics=False)
        api.delete("late")
    wait_for(
        lambda: job_label_values(fetch(replica), "chronoq_job_info") == {ODD_ID, "plain"},
        30,
        "the deleted job's series to go",
    )
    text = fetch(replica)
    assert "late" not in job_label_values(text, "chronoq_job_next_fire_timestamp_seconds")
    check_page(fetch(replica, OPENMETRICS), openmetrics=True)
