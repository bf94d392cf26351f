"""An existing exporter of Celery's events, run against a chronoq fleet, counts chronoq's
scheduled tasks: danihodovic's celery-exporter (on PyPI as ``prometheus-exporter-celery``).

It pins ``redis<6`` and ``prometheus-client<0.22``, so it cannot live in chronoq's virtualenv
(docs/observability.md says to run it in its own, or its container image). This test builds such a
virtualenv once per session with pip; without a package index (pip fails) it is skipped,
saying so.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import AppSettings
from tests.conftest import RedisServer, SchedulerProcess, WorkerProcess, free_port, serving, wait_for, write_jobs

pytestmark = pytest.mark.timeout(300)

EXPORTER = "prometheus-exporter-celery==0.11.2"
# The exporter pins redis<6, which kombu 5.6+ refuses: the last kombu and Celery that take it,
# and packaging, which kombu's Redis transport imports and the exporter's requirements miss.
EXTRAS = ("celery==5.5.3", "kombu>=5.5,<5.6", "packaging")


@pytest.fixture(scope="session")
def exporter_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("celery-exporter") / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run(
            [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", EXPORTER, *EXTRAS],
            check=True,
            capture_output=True,
            timeout=240,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", b"") or b""
        pytest.fail(f"could not install {EXPORTER} into its own virtualenv (no package index?): {output[-300:]!r}")
    return venv / "bin/python"


@pytest.fixture
def exporter(
    exporter_python: Path, settings: AppSettings, tmp_path: Path
) -> Iterator[Callable[[], dict[tuple[str, str], float]]]:
    """The exporter on a free port; yields a scrape: (metric, task name) -> value, summed."""
    port = free_port()
    command = [
        str(exporter_python),
        "-c",
        "from src.cli import cli; cli()",
        f"--broker-url={settings.broker_url()}",
        f"--port={port}",
        "--host=127.0.0.1",
    ]

    def scrape() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        totals: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:  # summed over hostname (scheduler or worker) and queue
                key = (sample.name, sample.labels.get("name", ""))
                totals[key] = totals.get(key, 0) + sample.value
        return totals

    with serving(command, tmp_path / "exporter.log", scrape, "celery-exporter to answer", 60, cwd=tmp_path):
        yield scrape


def test_celery_exporter_counts_chronoq_fires_sent_and_succeeded(
    settings: AppSettings,
    redis_server: RedisServer,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
    exporter: Callable[[], dict[tuple[str, str], float]],
) -> None:
    start_worker(settings, "--pool", "threads", "--concurrency", "2")
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "exported", "task": "demo.record_fire", "interval": 1}])
    start_scheduler(settings, jobs)

    def counted() -> dict[tuple[str, str], float] | None:
        samples = exporter()
        sent = samples.get(("celery_task_sent_total", "demo.record_fire"), 0)
        succeeded = samples.get(("celery_task_succeeded_total", "demo.record_fire"), 0)
        return samples if sent >= 3 and succeeded >= 3 else None

    samples = wait_for(counted, 60, "celery-exporter to count chronoq's tasks sent and succeeded", interval_s=0.5)
    assert (
        samples[("celery_task_sent_total", "demo.record_fire")]
        >= samples[("celery_task_succeeded_total", "demo.record_fire")] - 1
    )
