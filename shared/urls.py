"""Which query parameters a Redis URL may carry: an allow-list, checked when settings load.

redis-py and kombu turn a URL's query parameters into keyword arguments, and some of those
name Python objects that the client then imports: ``?credential_provider=evilmod.Evil`` made
``chronoq task submit`` import ``evilmod``. So a URL is data, like a job file: only the
parameters below are passed on, each a plain number, flag or path; any other parameter stops
the process at start (exit 78) before a client is built, so nothing is ever imported.

Everything else (TLS files and verification, timeouts, the password) has a setting of its own
(``REDIS_SSL_*``, ``REDIS_SOCKET_*``, ``REDIS_PASSWORD``); prefer those.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

ALLOWED_QUERY_PARAMETERS = frozenset(
    {
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "max_connections",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)
"""Query parameters of ``REDIS_URL``, ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` that
chronoq passes on to redis-py, kombu and Celery."""

_NAMES_CODE = ("class", "provider", "factory", "parser", "retry_on_error", "callback", "hook")


def url_query_problem(url: str) -> str | None:
    """Why ``url``'s query parameters are refused, or None. Never quotes a value (it may be secret)."""
    try:
        query = urlsplit(url).query
    except ValueError:
        return "is not a valid URL"
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name in ALLOWED_QUERY_PARAMETERS:
            continue
        why = (
            "names Python code the client would import"
            if any(word in name.lower() for word in _NAMES_CODE)
            else "is not passed on"
        )
        return (
            f"URL query parameter {name!r} {why}; allowed: {', '.join(sorted(ALLOWED_QUERY_PARAMETERS))} "
            "(TLS and timeouts also have REDIS_* settings)"
        )
    return None
