"""Fixtures of the web console tests: ``start_console`` runs ``chronoq web`` as its own process
on a free port, against the test's Redis and key prefix."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shared.settings import AppSettings
from tests.conftest import ROOT, free_port, settings_env, wait_for


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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


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
