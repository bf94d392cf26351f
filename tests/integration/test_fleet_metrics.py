"""The fleet collector against a real redis-server, in process: bounded per-job labels, the
short-lived cache that keeps frequent scrapes off Redis, a scrape while Redis is down, and the
/metrics page's cached per-job text against prometheus_client's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from scheduler.exposition import MetricsPage
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


def test_the_page_equals_prometheus_clients_exposition_and_forgets_deleted_jobs(
    settings: AppSettings, redis_server: RedisServer
) -> None:
    """The /metrics page (per-job part kept between scrapes) against a plain generate_latest of
    the same collector, over real Redis data, while jobs fire, pause and go away."""
    client = redis_server.client()
    keys = RedisKeys(settings.redis.key_prefix)
    jobs = specs(settings, 30)
    fleet = collector(client, settings, jobs, label_limit=25, cache_s=0)
    registry = CollectorRegistry()
    registry.register(fleet)
    page = MetricsPage(registry)
    page.collector = fleet
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        encoder, _ = choose_encoder(accept)
        for step in range(4):
            job = f"job-{step:02d}"
            client.hincrby(keys.job_counters(job), "dispatched", 1)
            client.hset(keys.job_counters(job), "last_success_ms", 1_700_000_000_000 + step)
            client.hset(keys.last_fire, job, json.dumps({"scheduled_at": f"2029-12-31T00:00:0{step}+00:00"}))
            client.hset(keys.paused, f"job-{step + 5:02d}", "{}")
            client.zadd(keys.inflight(f"job-{step + 9:02d}"), {"t": 1})
            assert page.body(accept)[0] == encoder(registry), (accept, step)
    assert fleet.cached_jobs() == 25
    del jobs[3:]  # the job list this replica runs shrinks (deleted through the API or a reload)
    body = page.body("")[0]
    assert body == generate_latest(registry)
    assert b'job="job-03"' not in body
    assert fleet.cached_jobs() == 3, "the deleted jobs' cached lines and values are dropped"


def test_queue_lengths_cover_the_jobs_queues_up_to_the_limit(settings: AppSettings, redis_server: RedisServer) -> None:
    client = redis_server.client()
    jobs = specs(settings, 4)
    jobs[1] = jobs[1].model_copy(update={"queue": "zeta"})
    jobs[2] = jobs[2].model_copy(update={"queue": "alpha"})
    jobs[3] = jobs[3].model_copy(update={"queue": "beta"})
    for queue, length in ((settings.celery.cron_queue, 1), ("alpha", 2), ("beta", 3), ("zeta", 4)):
        client.rpush(queue, *["m"] * length)
    fleet = collector(client, settings, jobs, cache_s=0)
    fleet.queue_limit = 2
    got = samples(fleet)
    lengths = {dict(labels)["queue"]: v for (name, labels), v in got.items() if name == "chronoq_queue_length"}
    # the configured queue first, then the jobs' by name: cron, alpha; beta and zeta summed up
    assert lengths == {settings.celery.cron_queue: 1, "alpha": 2, OTHER: 3 + 4}
    fleet.queue_limit = 100
    jobs.pop()  # beta's job is gone: so is its queue's series
    lengths = {
        dict(labels)["queue"]: v for (name, labels), v in samples(fleet).items() if name == "chronoq_queue_length"
    }
    assert lengths == {settings.celery.cron_queue: 1, "alpha": 2, "zeta": 4}
