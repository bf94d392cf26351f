"""The embedded redis-server, started on demand and shared by every chronoq process using one directory.

Without ``REDIS_URL``, ``chronoq scheduler`` and ``chronoq worker`` each enter an :class:`EmbeddedRedis`
on ``REDIS_EMBEDDED_DIR`` (default ``var/redis``): whichever comes first starts a ``redis-server``
there, the others find it through ``server.json``. The directory holds ``lock`` (flock'ed around
every acquire and release: never two servers), ``server.json`` (pid, port, binary, started_at,
users), redis's own ``redis.pid`` and ``redis.log``, and the data (AOF, fsync'ed every second).

- acquire: reuse the recorded server if that pid is a live redis-server running in this directory
  and answers PING on the recorded port as that pid. Otherwise kill every redis-server still running
  in this directory (a hung leftover, a stray whose server.json is gone) and start a fresh one on a
  free port. Then register a user: pid, process start time, token.
- release: drop our user and every user whose process is gone (a reused pid has another start time).
  The last one sends SHUTDOWN, escalates to SIGTERM then SIGKILL, and removes server.json.
- A process killed before it releases leaves its user behind, pruned by the next acquire or release;
  the next acquire reuses its server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import psutil
import redis
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import EmbeddedRedisError
from shared.redis_binary import find_redis_server_binary

HOST = "127.0.0.1"
STATE_FILE = "server.json"
LOCK_FILE = "lock"
PID_FILE = "redis.pid"
LOG_FILE = "redis.log"
_POLL_S = 0.05
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
# The redis-servers this process started, kept until they exit whoever stops them: waiting for them keeps
# them from lingering as zombies, and a Popen dropped before its process exits warns (ResourceWarning).
_started: list[subprocess.Popen[bytes]] = []


@dataclass
class _User:
    pid: int
    create_time: float
    token: str


@dataclass
class _State:
    pid: int
    port: int
    binary: str
    started_at: str
    users: list[_User] = field(default_factory=list)


class EmbeddedRedis:
    """One user of the redis-server shared by every process using ``embedded_dir``.

    ``acquire()`` (or ``with``) returns ``redis://127.0.0.1:<port>/0``, starting, reusing or
    replacing the server as the module docstring describes; ``release()`` (or leaving the ``with``)
    unregisters, and stops the server when this was its last live user. Both are safe to call
    twice; a forked child never releases its parent's registration. Times are in seconds:
    ``ready_timeout_s`` for a fresh server to answer PING, ``stop_timeout_s`` for SHUTDOWN before
    SIGTERM, ``lock_timeout_s`` to wait for another process's acquire or release.

    Raises :class:`EmbeddedRedisError` when no binary is found, the server does not start (the
    message holds the last lines of its log), or the lock stays taken.
    """

    def __init__(
        self,
        embedded_dir: Path,
        server_bin: Path | None = None,
        *,
        ready_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        lock_timeout_s: float = 60.0,
    ) -> None:
        self.directory = embedded_dir.resolve()
        self._server_bin = server_bin
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._lock_timeout_s = lock_timeout_s
        self._user: _User | None = None
        self.pid: int | None = None
        """The server's pid once acquired (kept after release, for inspection)."""
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``; raises :class:`EmbeddedRedisError` before the first acquire."""
        if self.port is None:
            raise EmbeddedRedisError(f"embedded redis in {self.directory} was not acquired")
        return f"redis://{HOST}:{self.port}/0"

    def __enter__(self) -> str:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> str:
        """Register as a user of the directory's server, starting one if needed; return its URL."""
        if self._user is not None and self._user.pid == os.getpid():
            return self.url
        me = _User(os.getpid(), psutil.Process().create_time(), uuid.uuid4().hex)
        with self._locked():
            state = self._read_state()
            if state is not None and self._healthy(state):
                state.users = [u for u in state.users if _alive(u.pid, u.create_time)]
                logger.info(
                    "embedded redis reused pid={} port={} dir={} users={}",
                    state.pid, state.port, self.directory, len(state.users) + 1,
                )  # fmt: skip
            else:
                killed = self._kill_strays(state)
                state = self._start()
                event = f"replaced old_pid={','.join(map(str, killed))}" if killed else "started"
                logger.info("embedded redis {} pid={} port={} dir={}", event, state.pid, state.port, self.directory)
            state.users.append(me)
            self._write_state(state)
        self._user, self.pid, self.port = me, state.pid, state.port
        return self.url

    def release(self) -> None:
        """Unregister; the last live user stops the server and removes the state file. Idempotent."""
        user, self._user = self._user, None
        if user is None or user.pid != os.getpid():
            return
        with self._locked():
            state = self._read_state()
            if state is None or state.pid != self.pid or all(u.token != user.token for u in state.users):
                # Someone replaced our server (it hung) or removed it: the current one is not ours to stop.
                logger.warning("embedded redis pid={} already gone or replaced dir={}", self.pid, self.directory)
                return
            state.users = [u for u in state.users if u.token != user.token and _alive(u.pid, u.create_time)]
            if state.users:
                self._write_state(state)
                logger.debug("embedded redis released pid={} users={}", state.pid, len(state.users))
                return
            self._stop(state)

    # -- under the lock -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        _reap()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self._lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EmbeddedRedisError(
                            f"{path}: still locked by another process after {self._lock_timeout_s} s "
                            f"(a chronoq process stuck while starting or stopping redis? see `fuser {path}`)"
                        ) from None
                    time.sleep(_POLL_S)
            yield
        finally:
            os.close(fd)  # releases the flock; the fd is never inherited by redis-server

    def _healthy(self, state: _State) -> bool:
        # Answering PING as the recorded pid rules out a reused pid and a reused port alike.
        return _is_server_of(state.pid, self.directory) and _probe(state.port, 3.0) == state.pid

    def _kill_strays(self, state: _State | None) -> list[int]:
        candidates = {state.pid} if state is not None else set()
        with contextlib.suppress(OSError, ValueError):
            candidates.add(int((self.directory / PID_FILE).read_text().strip()))
        # The pidfile may be gone too: any redis-server whose cwd is this directory serves its AOF.
        for proc in psutil.process_iter(["name"]):
            if str(proc.info["name"] or "").startswith("redis-server"):
                candidates.add(proc.pid)
        killed = sorted(pid for pid in candidates if _is_server_of(pid, self.directory))
        for pid in killed:
            logger.warning("embedded redis pid={} dir={} unhealthy or unrecorded: killing it", pid, self.directory)
            _terminate(pid, grace_s=3.0)
        return killed

    def _start(self) -> _State:
        binary = find_redis_server_binary(self._server_bin)
        log_path = self.directory / LOG_FILE
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            log_offset = log_path.stat().st_size if log_path.exists() else 0
            with log_path.open("ab") as log:
                # A session of its own: Ctrl-C in the terminal must not kill the server before the
                # last user has shut it down cleanly.
                proc = subprocess.Popen(
                    [str(binary), *self._config_args(port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            _started.append(proc)
            if self._wait_ready(proc, port, log_offset):
                started_at = datetime.now(UTC).isoformat(timespec="seconds")
                return _State(proc.pid, port, str(binary), started_at)
        raise EmbeddedRedisError(f"redis-server found no free port after {_PORT_ATTEMPTS} attempts; see {log_path}")

    def _config_args(self, port: int) -> list[str]:
        d = self.directory
        # Absolute paths: redis chdirs to `dir` while it reads its options. No RDB snapshots: the
        # AOF is the data, fsync'ed every second and on SHUTDOWN.
        return [
            "--port", str(port), "--bind", HOST, "--protected-mode", "yes", "--daemonize", "no",
            "--dir", str(d), "--pidfile", str(d / PID_FILE), "--logfile", str(d / LOG_FILE),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        ]  # fmt: skip

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, log_offset: int) -> bool:
        """True once ``proc`` answers PING; False if its port was taken meanwhile; raises otherwise."""
        deadline = time.monotonic() + self._ready_timeout_s
        while _probe(port, 0.5) != proc.pid:
            code = proc.poll()
            if code is not None:
                tail = self._log_tail(log_offset)
                if "Address already in use" in tail:
                    return False
                raise EmbeddedRedisError(
                    f"redis-server exited with code {code} before answering PING on port {port}; "
                    f"last lines of {self.directory / LOG_FILE}:\n{tail}"
                )
            if time.monotonic() >= deadline:
                _terminate(proc.pid, grace_s=2.0)
                raise EmbeddedRedisError(
                    f"redis-server pid={proc.pid} did not answer PING on port {port} within {self._ready_timeout_s} s "
                    f"(killed); last lines of {self.directory / LOG_FILE}:\n{self._log_tail(log_offset)}"
                )
            time.sleep(_POLL_S)
        return True

    def _stop(self, state: _State) -> None:
        # Never signal a pid that is no longer our redis-server: it may belong to anything by now.
        if _is_server_of(state.pid, self.directory):
            if _probe(state.port, 2.0) == state.pid:
                client = _client(state.port, 2.0)
                with contextlib.suppress(redis.RedisError), contextlib.closing(client):
                    client.shutdown()  # with AOF on, redis fsyncs it before exiting
            if not _wait_gone(state.pid, self._stop_timeout_s):
                logger.warning("embedded redis pid={} did not shut down: terminating", state.pid)
                _terminate(state.pid, grace_s=5.0)
        (self.directory / STATE_FILE).unlink(missing_ok=True)
        (self.directory / PID_FILE).unlink(missing_ok=True)  # left behind only when redis was killed
        logger.info("embedded redis stopped pid={} port={} dir={}", state.pid, state.port, self.directory)

    def _read_state(self) -> _State | None:
        path = self.directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return _State(**{**data, "users": [_User(**user) for user in data["users"]]})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("embedded redis state {} unreadable ({}): treating the server as unknown", path, exc)
            return None

    def _write_state(self, state: _State) -> None:
        # Write then rename, so a reader never sees half a file.
        path = self.directory / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
        os.replace(tmp, path)

    def _log_tail(self, offset: int) -> str:
        try:
            with (self.directory / LOG_FILE).open("rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log empty)"


def _client(port: int, timeout_s: float) -> redis.Redis:
    # No retries: a probe must answer within timeout_s, not four times that.
    return redis.Redis(
        host=HOST, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def _probe(port: int, timeout_s: float) -> int | None:
    """The pid of the redis answering PING on ``port`` within ``timeout_s``, else None."""
    client = _client(port, timeout_s)
    try:
        client.ping()
        return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


def _alive(pid: int, create_time: float | None = None) -> bool:
    """True if ``pid`` runs (a zombie does not) and, when given, started at ``create_time``."""
    try:
        proc = psutil.Process(pid)
        # A pid reused by a later process has a later start time.
        fresh = create_time is None or abs(proc.create_time() - create_time) < 1.0
        return fresh and bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _is_server_of(pid: int, directory: Path) -> bool:
    """True if ``pid`` is a live redis-server working in ``directory`` (redis chdirs to its ``dir``)."""
    try:
        proc = psutil.Process(pid)
        return _alive(pid) and proc.name().startswith("redis-server") and Path(proc.cwd()) == directory
    except psutil.Error:
        return False


def _reap() -> None:
    _started[:] = [proc for proc in _started if proc.poll() is None]


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if not _alive(pid):
            _reap()
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _terminate(pid: int, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)  # a stopped (SIGSTOP) server acts on SIGTERM only once it runs again
        if _wait_gone(pid, grace_s):
            return
    raise EmbeddedRedisError(f"redis-server pid={pid} survived SIGKILL; kill it by hand")


def _free_port() -> int:
    # The port may be taken before redis binds it; _start retries on "Address already in use".
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
