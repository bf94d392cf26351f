"""Sentinel settings (#15): names, validation (one line naming the setting), secrecy, and what
they make of the Redis clients and the Celery configuration. Pure: nothing connects."""

from __future__ import annotations

import os

import pytest
import redis

from shared.celery_app import celery_config, create_celery_app
from shared.errors import ConfigError, RedisAuthError, RedisUnavailableError
from shared.redaction import redact_url
from shared.redis import create_async_redis, create_redis, sentinel_options
from shared.redis_checks import describe_failure
from shared.sentinel import AsyncFollowingPool, FencedConnection, FollowingPool, ResultBackend, refused
from shared.settings import AppSettings

SENTINELS = {
    "REDIS_SENTINELS": "s1:26379, s2:26380,s3:26381",
    "REDIS_SENTINEL_MASTER": "mymaster",
    "REDIS_SENTINEL_PASSWORD": "sentinel-secret-1",
    "REDIS_PASSWORD": "data-secret-2",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("REDIS_", "CELERY_", "WORKER_", "LOG_", "SCHEDULER_", "APP_ENV", "TASK_MODULES")):
            monkeypatch.delenv(key)


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> AppSettings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return AppSettings.load()


def test_sentinel_settings_build_kombus_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **SENTINELS, REDIS_SENTINEL_DB="3")
    redis_settings = settings.redis
    assert redis_settings.uses_sentinel and not redis_settings.uses_tls
    assert redis_settings.sentinel_addresses() == [("s1", 26379), ("s2", 26380), ("s3", 26381)]
    url = redis_settings.connection_url()
    assert url == ";".join(f"sentinel://:data-secret-2@{host}/3" for host in ("s1:26379", "s2:26380", "s3:26381"))
    assert settings.broker_url() == settings.result_backend_url() == url
    # Children (a supervised or local worker) read the same REDIS_SENTINEL* settings, no REDIS_URL.
    assert redis_settings.child_env() == {}
    shown = redact_url(url)
    assert "data-secret-2" not in shown and shown.count(":***@") == 3
    assert "sentinel-secret-1" not in repr(settings) and "data-secret-2" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not"),
        ({"REDIS_SENTINELS": "s1:26379"}, "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not"),
        ({"REDIS_SENTINEL_PASSWORD": "x"}, "REDIS_SENTINEL_PASSWORD set but REDIS_SENTINELS is not"),
        ({"REDIS_SENTINEL_TLS": "true"}, "REDIS_SENTINEL_TLS set but REDIS_SENTINELS is not"),
        (
            {**SENTINELS, "REDIS_URL": "redis://h:6379/0"},
            "REDIS_URL and REDIS_SENTINELS are both set",
        ),
        (
            {**SENTINELS, "CELERY_BROKER_URL": "redis://h:6379/0"},
            "CELERY_BROKER_URL is set with REDIS_SENTINELS",
        ),
        ({**SENTINELS, "REDIS_SENTINELS": "s1"}, "REDIS_SENTINELS: 's1' is not host:port"),
        ({**SENTINELS, "REDIS_SENTINELS": "s1:99999"}, "REDIS_SENTINELS: 's1:99999' is not host:port"),
        ({**SENTINELS, "REDIS_SENTINEL_CHECK_S": "0"}, "REDIS_SENTINEL_CHECK_S: Input should be greater than 0"),
    ],
)
def test_inconsistent_sentinel_settings_are_one_line_naming_them(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(monkeypatch, **env)
    lines = str(raised.value).splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert "sentinel-secret-1" not in lines[0] and "data-secret-2" not in lines[0]


def test_celery_uses_the_sentinel_transport_for_broker_and_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **SENTINELS)
    config = celery_config(settings)
    assert config["broker_url"].startswith("sentinel://")
    assert config["result_backend"] == f"shared.sentinel:ResultBackend+{config['broker_url']}"
    transport = config["broker_transport_options"]
    assert transport["master_name"] == "mymaster"
    assert transport["sentinel_kwargs"]["password"] == "sentinel-secret-1"
    assert transport["visibility_timeout"] == settings.celery.visibility_timeout_s  # the rest is kept
    backend = config["result_backend_transport_options"]
    assert backend == {
        "master_name": "mymaster",
        "sentinel_kwargs": transport["sentinel_kwargs"],
        "chronoq_sentinel_check_s": 0.5,
    }
    app = create_celery_app(settings)
    assert type(app.backend) is ResultBackend and app.backend.url == config["broker_url"]
    pool = app.backend.client.connection_pool
    assert isinstance(pool, FollowingPool) and pool.connection_class is FencedConnection
    assert "broker_use_ssl" not in config


def test_a_result_backend_of_its_own_keeps_its_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **SENTINELS, CELERY_RESULT_BACKEND="redis://results:6379/1")
    config = celery_config(settings)
    assert config["result_backend"] == "redis://results:6379/1"
    assert "result_backend_transport_options" not in config


def test_sentinel_tls_reuses_the_ssl_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **SENTINELS, REDIS_SENTINEL_TLS="true", REDIS_SSL_CERT_REQS="none")
    assert settings.redis.uses_tls
    options = sentinel_options(settings.redis)
    assert options["ssl"] is True and options["ssl_cert_reqs"] == 0
    config = celery_config(settings)
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == 0
    client = create_redis(settings.redis)
    assert client.connection_pool.connection_class.__name__ == "FencedSSLConnection"


async def test_clients_follow_the_master_through_the_sentinels(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **SENTINELS, REDIS_SENTINEL_DB="2", REDIS_SENTINEL_CHECK_S="0.25")
    client = create_redis(settings.redis)
    pool = client.connection_pool
    assert isinstance(pool, FollowingPool) and pool.connection_class is FencedConnection
    assert pool.service_name == "mymaster" and pool._due.interval_s == 0.25
    assert pool.connection_kwargs["password"] == "data-secret-2" and pool.connection_kwargs["db"] == 2
    hosts = [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in pool.sentinel_manager.sentinels
    ]
    assert hosts == [("s1", 26379), ("s2", 26380), ("s3", 26381)]
    assert pool.sentinel_manager.sentinel_kwargs["password"] == "sentinel-secret-1"
    async_client = create_async_redis(settings.redis)
    assert isinstance(async_client.connection_pool, AsyncFollowingPool)
    await async_client.aclose()
    client.close()


def test_what_a_sentinel_failure_means(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **SENTINELS).redis
    url = settings.connection_url()
    auth = redis.sentinel.MasterNotFoundError(
        "No master found for 'mymaster' : Redis<s1> - AuthenticationError('invalid username-password pair')"
    )
    assert isinstance(describe_failure(auth, url, settings), RedisAuthError)
    assert "REDIS_SENTINEL_PASSWORD" in str(describe_failure(auth, url, settings))
    down = redis.sentinel.MasterNotFoundError("No master found for 'mymaster' : Redis<s1> - ConnectionError('refused')")
    error = describe_failure(down, url, settings)
    assert type(error) is RedisUnavailableError and "'mymaster' via Sentinels s1:26379" in str(error)
    assert "data-secret-2" not in str(error)


def test_a_fenced_master_reads_as_a_lost_connection() -> None:
    assert refused(redis.ResponseError("NOREPLICAS Not enough good replicas to write."))
    assert refused(
        redis.ResponseError("NOREPLICAS Not enough good replicas to write. script: 67ed, on @user_script:1.")
    )
    assert not refused(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert not refused(redis.ConnectionError("NOREPLICAS"))


def test_the_worker_keeps_its_transport_across_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's broker URL names one Sentinel (a list would make kombu's reconnect switch
    to its own sentinel:// transport, without chronoq's fixes); the Sentinels travel in a
    transport option its channel reads."""
    from workers.main import create_worker_app
    from workers.transport import SENTINELS_OPTION, SentinelChannel

    settings = load(monkeypatch, **SENTINELS)
    app = create_worker_app(settings)
    assert app.conf.broker_url == "sentinel://:data-secret-2@s1:26379/0"
    assert app.conf.broker_transport == "workers.transport:SentinelTransport"
    options = app.conf.broker_transport_options
    assert options[SENTINELS_OPTION] == ("s1:26379", "s2:26380", "s3:26381")
    assert options["master_name"] == "mymaster"
    assert SENTINELS_OPTION in SentinelChannel.from_transport_options
    assert "master_name" in SentinelChannel.from_transport_options
