"""The fleet collector against a real redis-server, in process: bounded per-job labels, the
short-lived cache that keeps frequent scrapes off Redis, and a scrape while Redis is down."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.fleetmetrics import OTHER, FleetCollector
from scheduler.specs import JobDefaults, JobSpec
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import RedisServer, free_port


def specs(settings: AppSettings, count: int) -> list[JobSpec]:
    defaults = JobDefaults.from_settings(settings.scheduler, settings.celery.cron_queue)
    return [defaults.make_spec(id=f"job-{i:02d}", task="demo.sleep", interval=10) for i in range(count)]


def collector(client: redis.Redis, settings: AppSettings, jobs: list[JobSpec], **options: float) -> FleetCollector:
    base = datetime(2030, 1, 1, tzinfo=UTC)
    return FleetCollector(
        client,
        RedisKeys(settings.redis.key_prefix),
        jobs=lambda: jobs,
        next_fires=lambda: {spec.id: base + timedelta(seconds=i) for i, spec in enumerate(jobs)},
        queue_keys=lambda queue: [queue],
        queues=[settings.celery.cron_queue],
        label_limit=int(options.get("label_limit", 1000)),
        cache_s=options.get("cache_s", 2.0),
    )


def samples(fleet: FleetCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(fleet)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_per_job_series_stop_at_the_limit_and_the_rest_is_summed_up(
    settings: AppSettings, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    keys = RedisKeys(settings.redis.key_prefix)
    jobs = specs(settings, 5)
    client.hset(keys.paused, mapping={"job-03": "{}", "job-04": "{}", "job-00": "{}"})
    client.hset(keys.last_fire, "job-04", json.dumps({"scheduled_at": "2029-12-31T00:00:00+00:00"}))
    client.hset(
        keys.job_counters("job-01"), mapping={"dispatched": 3, "failed": 2, "last_success_ms": 1_700_000_000_000}
    )
    client.zadd(keys.inflight("job-01"), {"t1": 1, "t2": 2})
    got = samples(collector(client, settings, list(reversed(jobs)), label_limit=2))
    info = {dict(labels)["job"] for (name, labels) in got if name == "chronoq_job_info"}
    assert info == {"job-00", "job-01"}, "the first jobs by id, whatever the registration order"
    assert got[("chronoq_jobs_unlabelled", ())] == 3
    assert got[("chronoq_job_paused", (("job", "job-00"),))] == 1
    assert got[("chronoq_job_paused", (("job", OTHER),))] == 2
    assert got[("chronoq_job_fires_total", (("job", "job-01"), ("outcome", "failed")))] == 2
    assert got[("chronoq_job_inflight", (("job", "job-01"),))] == 2
    assert got[("chronoq_job_last_success_timestamp_seconds", (("job", "job-01"),))] == 1_700_000_000
    assert ("chronoq_job_last_fire_timestamp_seconds", (("job", OTHER),)) not in got, "read for labelled jobs only"
    earliest_other = datetime(2030, 1, 1, tzinfo=UTC).timestamp()  # job-04 is first in the reversed list
    assert got[("chronoq_job_next_fire_timestamp_seconds", (("job", OTHER),))] == earliest_other
    assert not [labels for (_, labels) in got if ("job", "job-02") in labels]


def test_frequent_scrapes_read_redis_once_per_cache_period(settings: AppSettings, redis_server: RedisServer) -> None:
    client = redis_server.client()
    fleet = collector(client, settings, specs(settings, 3), cache_s=30)
    for _ in range(10):
        assert samples(fleet)[("chronoq_fleet_data_available", ())] == 1
    assert fleet.reads == 1
    fresh = collector(client, settings, specs(settings, 3), cache_s=0)
    for _ in range(3):
        samples(fresh)
    assert fresh.reads == 3


def test_a_scrape_while_redis_is_down_says_so_and_does_not_retry_at_once(settings: AppSettings) -> None:
    dead = redis.Redis(port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5)
    fleet = collector(dead, settings, specs(settings, 2), cache_s=30)
    for _ in range(5):
        got = samples(fleet)
        assert got[("chronoq_fleet_data_available", ())] == 0
        assert got[("chronoq_jobs", ())] == 2
        assert not [name for (name, _) in got if name.startswith(("chronoq_fires", "chronoq_job_"))]
    assert fleet.reads == 1, "a failed read is cached too: scrapes never queue up behind a dead Redis"
