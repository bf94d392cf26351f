"""Keeping secrets out of logs, reprs and error messages."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_MASK = "***"
# user:password@ inside any URL-looking text, whatever the scheme.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@")


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``; the rest stays readable.

    ``redis://:s3cret@host:6379/0`` -> ``redis://:***@host:6379/0``. A password given as a
    ``password=`` query parameter is masked too.
    """
    if ";" in url:  # kombu's list of Sentinels: sentinel://...;sentinel://...
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{_MASK}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", rf"\1{_MASK}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask URL credentials and each known secret string inside free text."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{_MASK}@", text)
    for secret in secrets:
        # Very short secrets would mask ordinary words; they are still masked in URLs above.
        if len(secret) >= 4:
            text = text.replace(secret, _MASK)
    return text
