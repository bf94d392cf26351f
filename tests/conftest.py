"""Shared fixtures: a real redis-server per session, settings per test, real worker processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.redis_binary import find_redis_server_binary
from shared.settings import AppSettings

ROOT = Path(__file__).resolve().parent.parent


def missing_test_tools() -> list[str]:
    """The Debian packages of ``scripts/test-tools.txt`` whose tool this machine lacks."""
    missing = []
    for line in (ROOT / "scripts" / "test-tools.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tool, package = line.split()[:2]
        found = Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None
        if not found and package not in missing:
            missing.append(package)
    return missing


def pytest_configure(config: pytest.Config) -> None:
    """Stop before any test runs when a tool the suite needs is missing: no test is skipped for
    a missing tool. ``scripts/test-deps`` (run by ``make test``) installs them."""
    missing = missing_test_tools()
    if missing:
        pytest.exit(
            f"missing Debian packages: {' '.join(missing)}; run scripts/test-deps (make test does), "
            f"or: sudo apt-get install -y {' '.join(missing)}",
            returncode=4,
        )


DURATIONS = ROOT / "tests" / "durations.json"
"""Each test's last measured wall time (setup, call and teardown), in seconds; refreshed with
``pytest -n 4 --record-durations`` (``make durations``). Only the order of the run depends on it."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true", help=f"write each test's wall time to {DURATIONS}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest tests first, so the pytest-xdist processes (given one test at a time,
    ``--maxschedchunk=1``) finish together instead of waiting on a long test that started last.
    A test not measured yet counts as a slow one."""
    known: dict[str, float] = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    items.sort(key=lambda item: -known.get(item.nodeid, 30.0))


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.getoption("--record-durations") and not hasattr(session.config, "workerinput"):
        measured = {nodeid: round(seconds, 2) for nodeid, seconds in sorted(_measured.items())}
        DURATIONS.write_text(json.dumps(measured, indent=0) + "\n")


PORT_BASE = 20000
PORT_BLOCK = 2000
PORT_BLOCKS = 6
"""Each pytest process (xdist worker ``gwN``) takes its ports from its own block of
:data:`PORT_BLOCK` below the kernel's ephemeral range (32768 and up), in turn from a random
start. A port the kernel hands out for ``bind(0)`` could be taken by another test process while
a server of this one is down for a restart on it; these are handed out by nobody else."""
_port_turn = itertools.count(random.randrange(PORT_BLOCK))


def free_port() -> int:
    """A loopback port nothing listens on, from this test process's block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = PORT_BASE + (int(worker) % PORT_BLOCKS if worker.isdigit() else 0) * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        port = start + next(_port_turn) % PORT_BLOCK
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + PORT_BLOCK - 1}")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 15, kill: Callable[[], None] | None = None) -> int:
    """SIGTERM to a process still running, then ``kill`` (default: SIGKILL to it) once
    ``timeout_s`` pass; returns its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            (kill or process.kill)()
            process.wait(5)
    return process.returncode


@contextlib.contextmanager
def serving(
    command: list[str], log_path: Path, probe: Callable[[], object], what: str, timeout_s: float, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (an HTTP service: Flower, celery-exporter) with its output in
    ``log_path`` until ``probe`` stops raising OSError; stop it on exit. A process that dies
    while starting fails the test with its log."""
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen)

    def answers() -> bool:
        try:
            probe()
            return True
        except OSError:
            return process.poll() is not None

    try:
        wait_for(answers, timeout_s, what)
        assert process.poll() is None, log_path.read_text()
        yield process
    finally:
        terminate(process, 10)
        log.close()


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def start_redis_server(tmp: Path, password: str | None = None) -> RedisServer:
    port = free_port()
    args = [
        str(find_redis_server_binary(None)),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        str(tmp),
    ]
    if password:
        args += ["--requirepass", password]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port=port, process=process, password=password)

    def answers() -> bool:
        try:
            return bool(server.client().ping())
        except redis.ConnectionError:
            return False

    wait_for(answers, 10, "redis-server to answer")
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session (no password)."""
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture(scope="session")
def secured_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server that requires a password."""
    server = start_redis_server(tmp_path_factory.mktemp("redis-auth"), password="s3cret-Pa55word-xyz")
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture
def namespace() -> str:
    """A short id unique to this test: queue names and key prefixes include it."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def settings(redis_server: RedisServer, namespace: str) -> AppSettings:
    """Settings pointing at the session Redis with this test's own queues and key prefix."""
    return make_settings(redis_server.url, namespace)


def make_settings(url: str, namespace: str, **overrides: Any) -> AppSettings:
    """Settings for ``url`` with queues and key prefix of their own; ``overrides`` are merged
    into the groups (``redis={"socket_timeout_s": 1}``)."""
    groups: dict[str, dict[str, Any]] = {
        "redis": {"url": url, "key_prefix": f"t{namespace}:"},
        "celery": {"cron_queue": f"cron_{namespace}", "default_queue": f"celery_{namespace}"},
    }
    fields: dict[str, Any] = dict(groups)
    for name, values in overrides.items():
        fields[name] = {**groups[name], **values} if name in groups else values
    return AppSettings(_env_file=None, **fields)


def settings_env(settings: AppSettings) -> dict[str, str]:
    """The environment that makes a child process build the same settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "CELERY_", "WORKER_", "LOG_", "SCHEDULER_", "HTTP_"))
    }
    redis_settings = settings.redis
    if redis_settings.uses_sentinel:
        env.update(
            REDIS_SENTINELS=",".join(redis_settings.sentinels),
            REDIS_SENTINEL_MASTER=str(redis_settings.sentinel_master),
        )
        if redis_settings.sentinel_password is not None:
            env["REDIS_SENTINEL_PASSWORD"] = redis_settings.sentinel_password.get_secret_value()
        if redis_settings.password is not None:
            env["REDIS_PASSWORD"] = redis_settings.password.get_secret_value()
    else:
        env["REDIS_URL"] = redis_settings.connection_url()
    env.update(
        APP_ENV="test",
        PYTHONUNBUFFERED="1",
        REDIS_KEY_PREFIX=settings.redis.key_prefix,
        CELERY_CRON_QUEUE=settings.celery.cron_queue,
        CELERY_DEFAULT_QUEUE=settings.celery.default_queue,
        HTTP_PORT="0",  # replicas started at once must not share the default port (start_scheduler picks one)
    )
    return env


@dataclass
class WorkerProcess:
    hostname: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15) -> int:
        return terminate(self.process, timeout_s, kill=lambda: os.killpg(self.process.pid, signal.SIGKILL))


def result_of(client: Any, task_id: str, timeout_s: float, worker: WorkerProcess) -> Any:
    """``client.result(task_id, timeout_s)`` (a :class:`shared.client.Client`); a timeout fails
    the test with the task's state and the end of ``worker``'s log, so that a failure says
    whether the task was never taken, still running, or done without the client hearing of it."""
    from celery.exceptions import TimeoutError as ResultTimeoutError

    try:
        return client.result(task_id, timeout=timeout_s)
    except ResultTimeoutError:
        state = client.status(task_id)
        pytest.fail(f"no result of {task_id} after {timeout_s}s, state {state}; worker log:\n{worker.log()[-4000:]}")


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``run_worker.py`` processes; each is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[WorkerProcess] = []

    def start(
        settings: AppSettings,
        *args: str,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        hostname = f"{name or 'w'}-{uuid.uuid4().hex[:6]}@test"
        log_path = tmp_path / f"{hostname}.log"
        env = {**settings_env(settings), **(extra_env or {})}
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "run_worker.py"), "--hostname", hostname, *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(hostname=hostname, process=process, log_path=log_path, env=env)
        started.append(worker)
        if wait_ready:
            wait_for(
                lambda: f"worker ready hostname={hostname}" in worker.log() or process.poll() is not None,
                30,
                f"worker {hostname} to be ready",
            )
            if process.poll() is not None:
                pytest.fail(f"worker {hostname} exited with {process.returncode}:\n{worker.log()[-3000:]}")
        return worker

    yield start
    for worker in started:
        worker.stop()


def queued_fires(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The task messages waiting in ``queue``, oldest first, as their Celery headers
    (``id``, ``task``, ``job_id``, ``scheduled_at``, ...)."""
    import json

    raw = client.lrange(queue, 0, -1)
    return [json.loads(item)["headers"] for item in reversed(raw)]


def write_jobs(path: Path, jobs: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> Path:
    """Write a YAML job file."""
    import yaml

    document: dict[str, Any] = {"jobs": jobs}
    if defaults:
        document["defaults"] = defaults
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@dataclass
class SchedulerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    http_port: int = 0
    """Its metrics and probe server's port (0: off)."""

    def get(self, path: str, timeout_s: float = 5) -> tuple[int, str]:
        """GET ``path`` from its HTTP server: (status, body)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout_s) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def owner(self) -> str:
        """The replica id (``host:pid:suffix``) it announced when it started."""
        import re

        found = re.search(r"scheduler (\S+) running \d+ jobs as", self.log())
        if found:
            return found.group(1)
        raise AssertionError(f"scheduler pid={self.process.pid} has not announced itself")

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout_s: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen replica hears the SIGTERM
        return terminate(self.process, timeout_s)


@pytest.fixture
def start_scheduler(tmp_path: Path) -> Iterator[Callable[..., list[SchedulerProcess]]]:
    """Start ``run_scheduler.py --no-worker`` replicas; each is stopped at teardown.

    ``start(settings, jobs, count=1)`` launches ``count`` replicas at once and waits until every
    one has announced itself."""
    started: list[SchedulerProcess] = []

    def start(
        settings: AppSettings,
        jobs: Path,
        *args: str,
        count: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> list[SchedulerProcess]:
        batch = []
        for _ in range(count):
            log_path = tmp_path / f"scheduler-{len(started)}.log"
            env = {**settings_env(settings), "HTTP_PORT": str(free_port()), **(extra_env or {})}
            with log_path.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker", *args],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            replica = SchedulerProcess(process, log_path, http_port=int(env["HTTP_PORT"]))
            started.append(replica)
            batch.append(replica)
        for replica in batch:
            wait_for(
                lambda r=replica: " jobs as " in r.log() or r.process.poll() is not None,  # type: ignore[misc]
                30,
                "a scheduler replica to start",
            )
            if replica.process.poll() is not None:
                pytest.fail(f"scheduler exited with {replica.process.returncode}:\n{replica.log()[-3000:]}")
        return batch

    yield start
    for replica in started:
        replica.stop()


def chronoq(settings: AppSettings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``chronoq`` operator command as its own process."""
    result = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"chronoq {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def executions(client: redis.Redis, settings: AppSettings) -> list[dict[str, Any]]:
    """What ``demo.record_fire`` ran, in order: job_id, scheduled_at, task_id, worker, started_ms."""
    import json

    return [json.loads(item) for item in client.lrange(f"{settings.redis.key_prefix}executions", 0, -1)]
