"""What a failure to reach Redis means, and the checks every process makes of the server at start.

A failure is either a configuration error that retrying cannot fix (exit 78: wrong password,
TLS misconfigured) or Redis being unavailable (exit 69, or retried by a daemon).
:func:`describe_failure` tells them apart, probing the port once when a TLS mismatch is the
likely cause: a ``redis://`` URL to a TLS port sees its connection reset, a ``rediss://`` URL
to a plain port sees its handshake time out; both look like a network fault otherwise.

:func:`check_eviction` refuses a server whose ``maxmemory-policy`` may evict keys: chronoq's
registry, fire records and the broker's queues would vanish without a word.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import redis
from loguru import logger
from redis.sentinel import MasterNotFoundError

from shared.errors import ChronoqError, ConfigError, RedisAuthError, RedisUnavailableError
from shared.redaction import redact_text, redact_url
from shared.settings import RedisSettings

PROBE_TIMEOUT_S = 2.0
EVICTING_POLICIES = ("allkeys-", "volatile-")


def describe_failure(exc: BaseException, url: str, settings: RedisSettings) -> ChronoqError:
    """The error a failed Redis call with ``url`` means: :class:`RedisAuthError` (credentials),
    :class:`ConfigError` (TLS), else :class:`RedisUnavailableError`. Messages show the URL
    redacted and name the setting to fix. May probe the server's port once (up to 2 s)."""
    shown = redact_url(url)
    text = str(exc)
    if isinstance(exc, MasterNotFoundError):
        return _sentinel_failure(text, settings)
    if isinstance(exc, redis.AuthenticationError) or (
        isinstance(exc, redis.ResponseError) and any(word in text for word in ("NOAUTH", "WRONGPASS", "AUTH"))
    ):
        return RedisAuthError(
            f"redis at {shown} rejected our credentials ({text}); fix the password in REDIS_URL or REDIS_PASSWORD"
        )
    tls = url.startswith("rediss://")
    causes = _chain(exc)
    if any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes) or "CERTIFICATE_VERIFY" in text:
        return ConfigError(
            f"redis at {shown}: TLS certificate verification failed ({_first_line(causes[-1])}); set "
            "REDIS_SSL_CA_CERTS to the CA that signed the server's certificate"
        )
    if any(isinstance(cause, ssl.SSLError) for cause in causes):
        return ConfigError(f"redis at {shown}: TLS handshake failed ({_first_line(causes[-1])}); check REDIS_SSL_*")
    if isinstance(exc, redis.ResponseError):
        return RedisUnavailableError(f"redis at {shown} answered with an error: {text}")
    host_port = _host_port(url)
    if host_port is not None and isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        if not tls and _reset_or_closed(causes) and _speaks_tls(*host_port):
            return ConfigError(
                f"redis at {shown}: the server expects TLS (it reset a plain connection); use a rediss:// URL"
            )
        if tls and isinstance(exc, redis.TimeoutError | TimeoutError) and _speaks_plain(*host_port):
            return ConfigError(
                f"redis at {shown}: the server does not speak TLS (the handshake got no answer); use a redis:// URL"
            )
    return RedisUnavailableError(f"redis at {shown} is unreachable: {text}")


def _sentinel_failure(text: str, settings: RedisSettings) -> ChronoqError:
    """No Sentinel named a master. redis-py folds each Sentinel's error into one message; a
    wrong Sentinel password shows there (retrying cannot fix it), anything else is waited for."""
    where = f"redis master {settings.sentinel_master!r} via Sentinels {','.join(settings.sentinels)}"
    if any(word in text for word in ("AuthenticationError", "WRONGPASS", "NOAUTH", "invalid password")):
        return RedisAuthError(
            f"{where}: a Sentinel rejected our credentials; fix REDIS_SENTINEL_PASSWORD (the Sentinels' own "
            "password, not the master's REDIS_PASSWORD)"
        )
    if "SSL" in text or "CERTIFICATE" in text:
        return ConfigError(f"{where}: TLS to a Sentinel failed; check REDIS_SENTINEL_TLS and REDIS_SSL_*")
    return RedisUnavailableError(f"{where}: no Sentinel named a healthy master ({redact_text(text)[:300]})")


def is_config_error(error: ChronoqError) -> bool:
    """True when retrying cannot help: the process should exit 78."""
    return isinstance(error, ConfigError | RedisAuthError)


def tls_warnings(settings: RedisSettings) -> list[str]:
    """Warnings about the TLS settings, logged at every start."""
    if settings.uses_tls and settings.ssl_cert_reqs == "none":
        return [
            "REDIS_SSL_CERT_REQS=none: the Redis server's TLS certificate is NOT verified; anyone on the path can "
            "impersonate it (set REDIS_SSL_CA_CERTS and REDIS_SSL_CERT_REQS=required)"
        ]
    return []


def eviction_policy(reply: Any) -> str | None:
    """The policy from a ``CONFIG GET maxmemory-policy`` reply (a dict or a flat list)."""
    if isinstance(reply, dict):
        value = reply.get("maxmemory-policy")
    elif isinstance(reply, list | tuple) and len(reply) >= 2:
        value = reply[1]
    else:
        value = None
    return value.decode() if isinstance(value, bytes) else value


def eviction_problem(policy: str | None) -> str | None:
    """Why ``policy`` loses data, or None."""
    if policy is None or not policy.startswith(EVICTING_POLICIES):
        return None
    return (
        f"Redis's maxmemory-policy is {policy}: under memory pressure it evicts keys, and chronoq's job registry, "
        "fire records and the broker's queued messages would vanish silently"
    )


def check_eviction(client: redis.Redis, settings: RedisSettings, url: str) -> str | None:
    """Read the server's eviction policy and return it (None when the server refuses CONFIG,
    as managed services do: a warning, and the process carries on).

    Raises :class:`ConfigError` for an evicting policy unless ``REDIS_ALLOW_EVICTION`` is set,
    in which case it warns."""
    try:
        policy = eviction_policy(client.config_get("maxmemory-policy"))
    except redis.ResponseError as exc:
        logger.warning("could not read Redis's maxmemory-policy ({}); make sure it is noeviction", exc)
        return None
    problem = eviction_problem(policy)
    if problem is None:
        return policy
    if settings.allow_eviction:
        logger.warning("{} (allowed by REDIS_ALLOW_EVICTION)", problem)
        return policy
    raise ConfigError(
        f"redis at {redact_url(url)}: {problem}; set `maxmemory-policy noeviction` on the server, or "
        "REDIS_ALLOW_EVICTION=true to accept the risk"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes and contexts, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0]


def _reset_or_closed(causes: list[BaseException]) -> bool:
    if any(isinstance(cause, ConnectionResetError | BrokenPipeError) for cause in causes):
        return True
    return any("closed by server" in str(cause) or "reset by peer" in str(cause) for cause in causes)


def _host_port(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        if parts.scheme in ("unix", "sentinel") or not parts.hostname:
            return None  # a Sentinel's port says nothing about the master's TLS
        return parts.hostname, parts.port or 6379
    except ValueError:
        return None


def _speaks_tls(host: str, port: int) -> bool:
    """Does ``host:port`` complete a TLS handshake? (Nothing is verified: it only tells the
    protocol apart; no data is sent.)"""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def _speaks_plain(host: str, port: int) -> bool:
    """Does ``host:port`` answer a plain ``PING`` (+PONG, or an error such as -NOAUTH)?"""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(1)[:1] in (b"+", b"-")
    except OSError:
        return False
