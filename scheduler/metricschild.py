"""The scheduler's side of its metrics server process (:mod:`scheduler.metricsd`): start, watch,
restart, stop.

Started with ``subprocess`` (never ``multiprocessing``: nothing is pickled), before anything
touches Redis: :meth:`MetricsChild.start` waits for the child to bind, and a port in use is the
child's one line as a :class:`ConfigError` (exit 78). The child's stdin is a pipe from the
scheduler; when the scheduler ends, however it ends (SIGKILL included), the pipe closes and the
child stops. If the child dies while the scheduler runs, the scheduler logs it and starts a new
one (every ``RESTART_S`` until one binds), passing it the settings and the attach message again;
the replica's counters are the scheduler's multiprocess files, so none is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from loguru import logger

from scheduler.metricsd import CONFIG_ENV, settings_line
from shared.errors import ChronoqError, ConfigError
from shared.settings import AppSettings

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0
RESTART_S = 2.0
STOP_TIMEOUT_S = 5.0


class MetricsChild:
    def __init__(self, settings: AppSettings, directory: Path) -> None:
        self.settings = settings
        self.dir = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.restarts = 0
        self._attach: bytes | None = None
        self._stopping = False
        self._restarting = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the server and wait until it listens; :class:`ConfigError` when it cannot bind."""
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}  # its own metrics: plain
        env[CONFIG_ENV] = json.dumps({"dir": str(self.dir), "parent_pid": os.getpid()})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler.metricsd"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=os.getcwd(),
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(settings_line(self.settings))
            process.stdin.flush()
            reply = _first_line(process.stdout, START_TIMEOUT_S)
        except OSError:
            reply = {}
        finally:
            process.stdout.close()
        if "port" not in reply:
            _end(process)
            error = reply.get("error")
            if error:
                raise ConfigError(str(error))
            raise ChronoqError(f"the metrics server process did not start (exit code {process.returncode})")
        self.process, self.port = process, int(reply["port"])
        if self._attach is not None:
            self._send(self._attach)

    def attach(self, settings: AppSettings, owner: str, queues: list[str]) -> None:
        """The scheduler runs: the child reads Redis (the one ``settings`` name) from now on."""
        message = json.loads(settings_line(settings))
        self._attach = json.dumps({"attach": message, "owner": owner, "queues": queues}).encode() + b"\n"
        self._send(self._attach)

    def _send(self, line: bytes) -> None:
        process = self.process
        if process is None or process.stdin is None:
            return
        try:
            process.stdin.write(line)
            process.stdin.flush()
        except OSError:  # it died: check() notices and starts another
            pass

    def check(self) -> None:
        """Called on every heartbeat: a dead child is logged and another started (in a thread:
        starting one waits for it to bind)."""
        process = self.process
        if process is None or self._stopping or self._restarting or process.poll() is None:
            return
        logger.error("metrics server (pid {}) exited with code {}: starting another", process.pid, process.returncode)
        self._restarting = True
        threading.Thread(target=self._restart, name="chronoq-metrics-restart", daemon=True).start()

    def _restart(self) -> None:
        try:
            while not self._stopping:
                try:
                    with self._lock:
                        if self._stopping:
                            return
                        self.start()
                    self.restarts += 1
                    logger.info("metrics server started again (pid {})", self.process.pid if self.process else 0)
                    return
                except ChronoqError as exc:
                    logger.error("metrics server not started again: {}; next try in {}s", exc, RESTART_S)
                    time.sleep(RESTART_S)
        finally:
            self._restarting = False

    def stop(self) -> None:
        """Close the child's stdin (it stops) and wait for it; kill it after ``STOP_TIMEOUT_S``."""
        self._stopping = True
        with self._lock:
            if self.process is not None:
                _end(self.process)


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)  # reaped: never left a zombie
        process.wait(STOP_TIMEOUT_S)


def _first_line(stream: IO[bytes], timeout_s: float) -> dict[str, Any]:
    """The child's reply, or {} when it ended (or stayed silent) first."""
    deadline = time.monotonic() + timeout_s
    data = b""
    fd = stream.fileno()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {}
        chunk = os.read(fd, 4096)
        if not chunk:
            return {}
        data += chunk
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}
