"""Who may use the console, and the checks on every change: authentication, read-only mode and
CSRF tokens for the pages' forms. Closed by default: with no credentials configured the console
only binds loopback (:func:`bind_problem`).

- The API takes ``Authorization: Bearer <WEB_TOKEN>`` or basic auth; pages take basic auth with
  ``WEB_USERNAME``/``WEB_PASSWORD`` (or any user name and ``WEB_TOKEN`` as the password).
- No credentials: 401 (with ``WWW-Authenticate``); a wrong bearer token: 403; a wrong basic
  password: 401, so a browser asks again.
- CSRF: a signed double-submit token. The ``chronoq_csrf`` cookie holds ``nonce.signature``
  (HMAC-SHA256 of the nonce with a key derived from the configured secrets, or a random key per
  process when none is configured); every form posts the same value, and the Origin header, when
  a browser sends one, must name this host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.settings import WebSettings

CSRF_COOKIE = "chronoq_csrf"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class User:
    """Who made a request: the audit trail records ``by``."""

    name: str
    client: str

    @property
    def by(self) -> str:
        return f"web:{self.name}@{self.client}"


def auth_configured(web: WebSettings) -> bool:
    return web.token is not None or (web.username is not None and web.password is not None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_problem(host: str, web: WebSettings) -> str | None:
    """Why the console must not listen on ``host``, or None."""
    if is_loopback(host) or auth_configured(web):
        return None
    return (
        f"WEB_HOST: refusing to listen on {host} without authentication: set WEB_TOKEN or "
        "WEB_USERNAME and WEB_PASSWORD, or bind 127.0.0.1"
    )


class Guard:
    """The console's checks, on the settings it was created with."""

    def __init__(self, web: WebSettings) -> None:
        self.web = web
        material = b"".join(s.get_secret_value().encode() + b"\0" for s in (web.token, web.password) if s is not None)
        # Copies of the console behind one load balancer accept each other's tokens when they
        # share credentials; without any, each process has its own key (a restart asks again).
        self._key = hashlib.sha256(b"chronoq-csrf\0" + material).digest() if material else secrets.token_bytes(32)

    def user(self, request: Request) -> User:
        """The request's user; raises HTTPException 401/403 (see the module docstring)."""
        client = request.client.host if request.client else "unknown"
        if not auth_configured(self.web):
            return User("anonymous", client)
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            if self.web.token is not None and hmac.compare_digest(value.encode(), self._secret(self.web.token)):
                return User("token", client)
            raise HTTPException(403, "wrong token")
        if scheme.lower() == "basic" and value:
            name, password = _basic(value)
            if name is not None and self._password_ok(name, password):
                return User(name, client)
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="chronoq"'})

    @staticmethod
    def _secret(value: object) -> bytes:
        return str(value.get_secret_value()).encode()  # type: ignore[attr-defined]

    def _password_ok(self, name: str, password: str) -> bool:
        given = password.encode()
        ok = False
        if self.web.username is not None and self.web.password is not None:
            ok = hmac.compare_digest(name.encode(), self.web.username.encode()) & hmac.compare_digest(
                given, self._secret(self.web.password)
            )
        if self.web.token is not None:
            ok = ok | hmac.compare_digest(given, self._secret(self.web.token))
        return ok

    def writable(self) -> None:
        if self.web.read_only:
            raise HTTPException(403, "the console is read-only (WEB_READ_ONLY=true): nothing changed")

    # -- CSRF ---------------------------------------------------------------------------------
    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce)}"

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def token_valid(self, token: str) -> bool:
        nonce, _, signature = token.partition(".")
        return bool(nonce) and hmac.compare_digest(signature, self._sign(nonce))

    def check_csrf(self, request: Request, submitted: str) -> None:
        """Raises HTTPException 403 unless the form's token equals the cookie's and is signed
        by this console, and a browser's Origin (when sent) is this host."""
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):  # "null" too: an opaque origin
            raise HTTPException(403, f"CSRF: cross-origin form from {origin}: nothing changed")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not submitted or not cookie or not hmac.compare_digest(submitted, cookie) or not self.token_valid(cookie):
            raise HTTPException(403, "CSRF token missing or invalid (reload the page and try again): nothing changed")


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""Only the console's own files run or style its pages: no inline script, event handler, style
or eval (htmx is configured not to need them, see base.html), nothing from another origin, no
framing by any page (clickjacking), forms post only to the console."""
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # not no-referrer: a form's Origin would be "null" (CSRF check)
    (b"cross-origin-opener-policy", b"same-origin"),
)


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP answer (pages, API, static files,
    errors), unless the answer set one of them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _basic(value: str) -> tuple[str | None, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else (None, "")
