"""``chronoq web``: serve the console with uvicorn, closed by default."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
from collections.abc import Iterator

from loguru import logger

from scheduler.web.security import auth_configured, bind_problem, is_loopback
from shared.errors import ConfigError
from shared.settings import AppSettings

SHUTDOWN_GRACE_S = 5
"""On SIGTERM, requests still open (a slow page) get this long before the console exits."""
KEEP_ALIVE_S = 20
"""Idle connections are kept this long: above the slowest live region's poll (15 s), so an open
tab polls on one connection (uvicorn's default of 5 s equals the fastest poll: each one raced
the server closing the connection, and opened a new one)."""


def check_bind(host: str, port: int, settings: AppSettings) -> socket.socket:
    """The listening socket, bound before the app starts. Raises ConfigError (exit 78) for a
    non-loopback address without authentication, or an address or port that cannot be used."""
    if (problem := bind_problem(host, settings.web)) is not None:
        raise ConfigError(problem)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"WEB_HOST: cannot resolve {host!r}: {exc.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stall on kept-alive connections
    try:
        sock.bind(info[4])
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigError(f"WEB_PORT: {host}:{port} {why}; choose another with --port or WEB_PORT") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_web(settings: AppSettings, host: str | None, port: int | None) -> int:
    """``chronoq web``: check the address, find Redis (the embedded server without
    ``REDIS_URL``), serve until SIGINT/SIGTERM. Settings, credentials and TLS mistakes are
    ConfigError (78); Redis merely down is logged and the console answers 503 until it is back."""
    from shared.cli_support import apply_overrides, exit_code
    from shared.errors import EX_CONFIG, RedisUnavailableError
    from shared.redis import check_redis, resolve_redis

    settings = apply_overrides(settings, web={"host": host, "port": port})
    sock = check_bind(settings.web.host, settings.web.port, settings)
    try:
        with resolve_redis(settings) as resolved:
            try:
                check_redis(resolved.redis)
            except RedisUnavailableError as exc:
                if exit_code(exc) == EX_CONFIG:
                    raise
                logger.warning("redis unavailable at start ({}); pages answer 503 until it is back", exc)
            return serve(resolved, settings.web.host, sock)
    finally:
        sock.close()


def serve(settings: AppSettings, host: str, sock: socket.socket) -> int:
    """Serve on the bound ``sock`` until SIGINT/SIGTERM; returns the exit code."""
    import uvicorn

    from scheduler.web.app import create_app

    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if not is_loopback(host):
        logger.warning("console listening on non-loopback {}:{} (authentication configured)", host, bound_port)
    mode = " read-only" if settings.web.read_only else ""
    auth = "authentication required" if auth_configured(settings.web) else "no authentication (loopback only)"
    logger.info("chronoq web console{} at http://{}:{}/ ({})", mode, shown, bound_port, auth)
    print(f"chronoq web: console at http://{shown}:{bound_port}/  API at http://{shown}:{bound_port}/api/v1/docs",
          flush=True)  # fmt: skip
    config = uvicorn.Config(
        create_app(settings), log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, timeout_keep_alive=KEEP_ALIVE_S,
        server_header=False,  # no 'Server: uvicorn': nothing to tell a scanner
    )  # fmt: skip
    _server_class()(config).run(sockets=[sock])
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGTERM/SIGINT once it has shut down, which ends the process
            # before ``run_web`` releases the embedded Redis; stop and return instead.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
