"""The shipped alert rules and Grafana dashboard: promtool accepts and unit-tests the rules, and
every metric they query is one a replica actually exports (collected from a real registry over
a real Redis holding one of each kind of fleet data)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.fleetmetrics import FleetCollector
from scheduler.metrics import ReplicaMetrics
from scheduler.specs import JobDefaults
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import ROOT, RedisServer

DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool") or "promtool"  # Debian's prometheus: scripts/test-tools.txt
METRIC = re.compile(r"\b(chronoq_[a-z0-9_]+)\b")


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(DEPLOY / "prometheus/alerts.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def exported(settings: AppSettings, redis_server: RedisServer) -> set[str]:
    """Every sample name a replica's /metrics shows with one of each kind of fleet data."""
    client = redis_server.client()
    keys = RedisKeys(settings.redis.key_prefix)
    spec = JobDefaults.from_settings(settings.scheduler, settings.celery.cron_queue).make_spec(
        id="j", task="demo.sleep", interval=10
    )
    now_ms = int(time.time() * 1000)
    client.hset(keys.counters, mapping={"dispatched": 1, "failed": 1})
    client.hset(keys.job_counters("j"), mapping={"dispatched": 1, "failed": 1, "last_success_ms": now_ms})
    client.hset(keys.last_fire, "j", json.dumps({"scheduled_at": "2030-01-01T00:00:00+00:00"}))
    client.hset(keys.replicas, "r", json.dumps({"heartbeat_ms": now_ms}))
    client.hset(keys.workers, "w", json.dumps({"last_seen_ms": now_ms}))
    metrics = ReplicaMetrics()
    metrics.registry.register(
        FleetCollector(
            client,
            keys,
            jobs=lambda: [spec],
            next_fires=lambda: {"j": datetime(2030, 1, 1, tzinfo=UTC)},
            queue_keys=lambda queue: [queue],
            queues=["q"],
            label_limit=10,
            cache_s=0,
        )
    )
    metrics.fire_lag.observe(0.1)
    text = generate_latest(metrics.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def queried(texts: list[str]) -> set[str]:
    return {name for text in texts for name in METRIC.findall(text)}


def test_the_dashboard_parses_and_queries_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads((DEPLOY / "grafana/chronoq.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 20
    names = queried(exprs)
    assert names - exported == set(), "the dashboard queries metrics nobody exports"
    assert {"chronoq_fire_lag_seconds_bucket", "chronoq_fires_total", "chronoq_leader"} <= names


def test_the_alerts_query_only_exported_metrics(exported: set[str]) -> None:
    import yaml

    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    names = queried(exprs)
    assert names - exported == set(), "an alert queries a metric nobody exports"


def test_the_metric_list_in_the_docs_is_what_is_exported(exported: set[str]) -> None:
    page = Path(ROOT / "docs" / "observability.md").read_text()
    documented = {name for name in METRIC.findall(page)}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported}
    assert documented - exported - families == set(), "docs/observability.md names metrics that do not exist"
    missing = {name for name in families if name.startswith("chronoq_")} - documented
    assert missing == set(), "exported metrics missing from docs/observability.md's list"
