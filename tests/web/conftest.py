"""Fixtures of the web console tests: ``start_console`` runs ``chronoq web`` as its own process
on a free port, against the test's Redis and key prefix."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shared.settings import AppSettings
from tests.conftest import ROOT, free_port, settings_env, terminate, wait_for


@dataclass
class ConsoleProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **options)  # type: ignore[arg-type]

    def stop(self, timeout_s: float = 15) -> int:
        return terminate(self.process, timeout_s)


class CountingProxy:
    """A TCP proxy in front of a console that records every HTTP request line passing through
    it (time, method, target): what the server receives, whatever the browser thinks it sent."""

    REQUEST = re.compile(rb"(GET|POST|HEAD|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]")

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def seen(self, path_prefix: str) -> list[float]:
        """When requests for targets starting with ``path_prefix`` arrived."""
        with self._lock:
            return [at for at, _, target in self.requests if target.startswith(path_prefix)]

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the console has stopped: the browser's retry is refused too
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        pending = b""
        try:
            while data := source.recv(65536):
                if requests:  # complete lines only; no body of these pages' requests holds a request line
                    *lines, pending = (pending + data).split(b"\r\n")
                    found = [m for line in lines if (m := self.REQUEST.fullmatch(line))]
                    with self._lock:
                        self.requests += [(time.monotonic(), m[1].decode(), m[2].decode()) for m in found]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/static/console.css", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., ConsoleProcess]]:
    """``start_console(settings, extra_env={...})``: a ``chronoq web`` process, stopped at teardown."""
    started: list[ConsoleProcess] = []

    def start(settings: AppSettings, *args: str, extra_env: dict[str, str] | None = None) -> ConsoleProcess:
        port = free_port()
        log_path = tmp_path / f"console-{len(started)}.log"
        env = {k: v for k, v in settings_env(settings).items() if not k.startswith("WEB_")}
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "web", "--port", str(port), *args],
                cwd=ROOT,
                env={**env, **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        console = ConsoleProcess(f"http://127.0.0.1:{port}", process, log_path)
        started.append(console)
        wait_for(lambda: process.poll() is not None or answers(console.url), 30, "the console to answer")
        if process.poll() is not None:
            pytest.fail(f"chronoq web exited with {process.returncode}:\n{console.log()[-3000:]}")
        return console

    yield start
    for console in started:
        console.stop()
