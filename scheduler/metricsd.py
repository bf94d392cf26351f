"""The metrics and probe server process: ``python -m scheduler.metricsd``, started by the scheduler.

A scrape at 10,000 labelled jobs takes tens of milliseconds of CPU. In the scheduler's own
process that CPU is taken under its GIL, while the event loop's thread waits, and fire lag
grows; here it is another process's. The scheduler (:mod:`scheduler.metricschild`) starts it,
owns it and passes everything as JSON or raw arrays, never pickled:

- ``CHRONOQ_METRICSD`` (environment): ``{"dir": ..., "parent_pid": ...}``, the shared
  directory (:mod:`scheduler.replicastate`) and the scheduler's pid (its ``process_*`` metrics).
- stdin, one JSON document a line: first the settings (secrets included: a pipe, never a log
  or the environment), later ``{"attach": settings, "owner": ..., "queues": [...]}`` once the
  scheduler runs (the settings then name the Redis actually used). End of file means the
  scheduler has ended (its end of the pipe closes even when it is SIGKILLed): the server stops.
- stdout, one JSON line: ``{"port": n}`` once bound, or ``{"error": "..."}`` and exit 78 when
  it cannot bind (the scheduler turns it into its own one-line error and exit 78).

``/metrics`` is the replica's own metrics from ``prometheus_client``'s multiprocess files
(written by the scheduler; help texts put back), the scheduler's ``process_*`` metrics, and the
fleet and per-job families read from Redis by this process's own client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from pydantic import SecretStr

from scheduler.exposition import MetricsPage
from scheduler.fleetmetrics import FleetCollector
from scheduler.metrics import ReplicaMetrics
from scheduler.probes import Probes, ProbeServer, ReplicaView
from scheduler.replicastate import ATTACHED, BEAT, DONE, FRESH_S, JOBS, LEADER, REFRESHED, STOPPING, StateReader
from shared.errors import EX_CONFIG, ConfigError
from shared.logging import configure_logging
from shared.names import RedisKeys
from shared.redis import create_redis
from shared.settings import AppSettings

CONFIG_ENV = "CHRONOQ_METRICSD"
STALE_S = 2.5
"""Job data older than this (or none yet): a scrape waits up to ``WAIT_S`` for new data."""
WAIT_S = 0.5
NICE = 10
"""The server's niceness above its scheduler's: on a busy machine a scrape waits for a core
rather than the fires (it still gets about a tenth of a contended core: probes answer)."""
FLEET_READ_TIMEOUT_S = 2.0
"""Socket timeout of the server's Redis client: a scrape during a Redis stall answers (without
fleet data) well within Prometheus' default 10 s scrape timeout."""


def settings_line(settings: AppSettings) -> bytes:
    """``settings`` as one JSON line, secrets revealed (for the pipe to the child only)."""

    def plain(value: Any) -> Any:
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    return json.dumps(settings.model_dump(), default=plain).encode() + b"\n"


def read_settings(line: str) -> AppSettings:
    return AppSettings(_env_file=None, **json.loads(line))  # type: ignore[call-arg]


class Documented(Collector):
    """The multiprocess files' families with their help texts (the files do not keep them)."""

    def __init__(self, source: Collector) -> None:
        self.source = source
        self.help = {m.name: m.documentation for m in ReplicaMetrics(CollectorRegistry()).registry.collect()}

    def collect(self) -> Iterator[Metric]:
        for metric in self.source.collect():
            metric.documentation = self.help.get(metric.name, metric.documentation)
            yield metric


class SharedProbes(Probes):
    """Liveness and readiness from the scheduler's shared state."""

    def __init__(self, liveness_timeout_s: float, state: StateReader) -> None:
        super().__init__(liveness_timeout_s)
        self.state = state

    def last_beat(self) -> float:
        return self.state.block.get(BEAT)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        block = self.state.block
        self.stopping = bool(block.get(STOPPING))
        if not block.get(ATTACHED):
            self.replica = None
        return super().readiness()


class SyncedPage(MetricsPage):
    """``/metrics``, with the scheduler's job data brought up to date first."""

    def __init__(self, registry: CollectorRegistry, state: StateReader) -> None:
        super().__init__(registry)
        self.state = state

    def pieces(self, accept: str | None, names: list[str] | None = None) -> tuple[list[bytes], str]:
        sync(self.state)
        return super().pieces(accept, names)


def sync(state: StateReader) -> None:
    """Ask for new job data when it is older than ``FRESH_S`` (the scheduler writes it at its next
    heartbeat); wait for it only when there is none yet or it is older than ``STALE_S``."""
    age_s = time.monotonic() - state.block.get(REFRESHED)
    if age_s >= FRESH_S:
        target = state.request()
        if state.gen < 0 or age_s > STALE_S:
            deadline = time.monotonic() + WAIT_S
            while state.block.get(DONE) < target and time.monotonic() < deadline:
                time.sleep(0.005)
    state.load()


def attach(message: dict[str, Any], state: StateReader, page: MetricsPage, probes: Probes) -> Any:
    """Fleet metrics and readiness, once the scheduler runs; returns the Redis client."""
    settings = read_settings(json.dumps(message["attach"]))
    timeout = min(settings.redis.socket_timeout_s, FLEET_READ_TIMEOUT_S)
    redis_settings = settings.redis.model_copy(
        update={"socket_timeout_s": timeout, "socket_connect_timeout_s": timeout}
    )
    client = create_redis(redis_settings)
    http = settings.http
    collector = FleetCollector(
        client,
        RedisKeys(settings.redis.key_prefix),
        jobs=lambda: state.rows,
        next_fires=lambda: state.next_fires,
        queue_keys=lambda name: state.queue_keys[name],
        queues=message["queues"],
        label_limit=http.job_label_limit,
        queue_limit=http.queue_label_limit,
        cache_s=http.fleet_cache_s,
    )
    page.registry.register(collector)
    page.collector = collector
    probes._ping = client.ping
    block = state.block
    role = lambda: "leader" if block.get(LEADER) else "follower"  # noqa: E731
    probes.replica = ReplicaView(role=role, jobs=lambda: int(block.get(JOBS)), owner=message["owner"])
    return client


def main() -> int:
    # It ends with its scheduler (end of stdin), not on a signal meant for the scheduler: Ctrl-C
    # and a terminal's hangup reach the whole process group, systemd's SIGTERM the whole unit.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    os.nice(NICE)
    config = json.loads(os.environ[CONFIG_ENV])
    directory, parent = Path(config["dir"]), int(config["parent_pid"])
    settings = read_settings(sys.stdin.readline())
    configure_logging(settings, process="metrics", stream=sys.stderr)  # stdout is the reply pipe
    # None of these collectors describes itself (the multiprocess files and the fleet's families
    # are known only when collected): without this, a name[] filter dropped every one of them.
    registry = CollectorRegistry(support_collectors_without_names=True)
    registry.register(Documented(MultiProcessCollector(None, path=str(directory / "prom"))))  # type: ignore[no-untyped-call]
    ProcessCollector(pid=lambda: parent, registry=registry)  # the scheduler's, not this process's
    PlatformCollector(registry=registry)
    state = StateReader(directory)
    probes = SharedProbes(settings.http.liveness_timeout_s, state)
    page = SyncedPage(registry, state)
    try:
        server = ProbeServer(settings.http, page, probes)
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return EX_CONFIG
    print(json.dumps({"port": server.port}), flush=True)
    server.start()
    client = None
    try:
        for line in sys.stdin:  # until the scheduler ends: its end of the pipe closes
            message = json.loads(line)
            if "attach" in message and client is None:
                client = attach(message, state, page, probes)
    finally:
        server.stop()
        if client is not None:
            client.close()
        if not _alive(parent):  # killed: nobody else cleans up its files
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) still answers signal 0; its state says.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
