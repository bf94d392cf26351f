"""The replica's HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``, off the event loop.

A WSGI app served by the standard library's ``wsgiref`` server in daemon threads (one per
request, as ``prometheus_client.start_http_server`` does): no dependency beyond
``prometheus_client`` itself. It runs in the metrics server process the scheduler starts
(:mod:`scheduler.metricsd`), so a scrape's CPU is not taken under the scheduler's GIL, and it
keeps answering while the scheduler's loop is wedged, which is exactly when ``/healthz`` must
say so.

- ``/metrics``: ``prometheus_client``'s exposition of the replica's registry (its own metrics,
  process metrics and the fleet collector), gzip when asked, OpenMetrics when asked; the per-job
  families kept between scrapes (:mod:`scheduler.exposition`).
- ``/healthz`` (liveness): 200 while the event loop's heartbeat coroutine ticked within
  ``HTTP_LIVENESS_TIMEOUT_S``; 503 otherwise, so a wedged loop is seen even though this thread
  still answers.
- ``/readyz`` (readiness): 200 once the jobs are loaded and Redis answers a PING, with the
  replica's role in a JSON body; 503 with the reason otherwise.

The bind happens before anything else starts: a port in use is a :class:`ConfigError` (exit 78)
naming the address. A non-loopback address is allowed, and logged: the endpoints have no
authentication.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from loguru import logger

from scheduler.exposition import MetricsPage
from shared.errors import ConfigError
from shared.settings import HttpSettings

PING_CACHE_S = 1.0
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log; errors still go through log_error."""


@dataclass
class ReplicaView:
    """What the probes ask the running replica; set by the service once its jobs are loaded."""

    role: Callable[[], str]
    jobs: Callable[[], int]
    owner: str


class Probes:
    """Liveness state (a monotonic heartbeat) and readiness, read by the HTTP threads."""

    def __init__(self, liveness_timeout_s: float, ping: Callable[[], object] | None = None) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        self.beat = time.monotonic()
        """Monotonic time of the event loop's last heartbeat tick."""
        self.replica: ReplicaView | None = None
        self.stopping = False
        self._ping = ping
        self._ping_lock = threading.Lock()
        self._pinged: tuple[float, str | None] = (-float("inf"), "not checked")

    def last_beat(self) -> float:
        """Monotonic time of the loop's last heartbeat (the metrics server reads it from the
        scheduler's shared state instead)."""
        return self.beat

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        silent_s = time.monotonic() - self.last_beat()
        alive = silent_s <= self.liveness_timeout_s
        body = {"alive": alive, "loop_silent_s": round(silent_s, 3), "timeout_s": self.liveness_timeout_s}
        return alive, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        replica = self.replica
        if self.stopping:
            return False, {"ready": False, "reason": "shutting down"}
        if replica is None:
            return False, {"ready": False, "reason": "starting: jobs not loaded yet"}
        problem = self._redis_problem()
        if problem is not None:
            return False, {"ready": False, "reason": f"redis: {problem}", "replica": replica.owner}
        return True, {"ready": True, "role": replica.role(), "jobs": replica.jobs(), "replica": replica.owner}

    def _redis_problem(self) -> str | None:
        """None if Redis answered a PING within the last PING_CACHE_S, else the error."""
        if self._ping is None:
            return None
        with self._ping_lock:
            at, problem = self._pinged
            if time.monotonic() - at < PING_CACHE_S:
                return problem
            try:
                self._ping()
                problem = None
            except (redis.RedisError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
            self._pinged = (time.monotonic(), problem)
            return problem


def probe_app(metrics: MetricsPage, probes: Probes) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path in ("/healthz", "/readyz"):
            ok, body = probes.liveness() if path == "/healthz" else probes.readiness()
            data = json.dumps(body).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        data = b"not found: chronoq serves /metrics, /healthz and /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
        return [data]

    return app


class ProbeServer:
    """Bound at construction (errors early), serving from :meth:`start` until :meth:`stop`."""

    def __init__(self, settings: HttpSettings, metrics: MetricsPage, probes: Probes) -> None:
        self.settings = settings
        try:
            self._server = make_server(
                settings.host,
                settings.port,
                probe_app(metrics, probes),
                _Server6 if ":" in settings.host else _Server,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise ConfigError(
                f"HTTP_HOST/HTTP_PORT: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} "
                "(choose a free HTTP_PORT, or 0 to turn the metrics and probe server off)"
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="chronoq-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        where = f"http://{_url_host(self.settings.host)}:{self.port}"
        logger.info("metrics at {}/metrics, probes at {}/healthz and {}/readyz", where, where, where)
        if not _is_loopback(self.settings.host):
            logger.warning(
                "HTTP_HOST={}: the metrics and probe server listens beyond this host, without authentication",
                self.settings.host,
            )

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
