"""A Redis Sentinel group of real processes for the failover tests: Debian's ``redis-server``
(one master, one replica) and three ``redis-sentinel`` processes, all on free loopback ports,
with a data password and a Sentinel password of their own.

Sentinel is set to act fast (``down-after-milliseconds`` 1000, ``failover-timeout`` 3000), so a
SIGKILLed master is replaced within a few seconds.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, terminate, wait_for
from tests.faults.harness import RedisProcess

DEBIAN_REDIS_SERVER = Path("/usr/bin/redis-server")
DEBIAN_REDIS_SENTINEL = Path("/usr/bin/redis-sentinel")
MASTER_NAME = "chronoq-master"
DATA_PASSWORD = "data-pw-5f1e"
SENTINEL_PASSWORD = "sentinel-pw-93ab"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def require_debian_redis() -> None:
    for binary in (DEBIAN_REDIS_SERVER, DEBIAN_REDIS_SENTINEL):
        if not binary.exists():
            pytest.fail(f"{binary} (Debian's redis-server and redis-sentinel) is needed: .ci/run installs them")


@dataclass
class SentinelProcess:
    directory: Path
    master_port: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "sentinel.conf"  # Sentinel rewrites it: one file per process
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {self.directory}",
                    f"requirepass {SENTINEL_PASSWORD}",
                    f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2",
                    f"sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        with (self.directory / "sentinel.log").open("wb") as log:
            self.process = subprocess.Popen(
                [str(DEBIAN_REDIS_SENTINEL), str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self.answers, 15, f"redis-sentinel on port {self.port} to answer")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, password=SENTINEL_PASSWORD, decode_responses=True, socket_timeout=2)

    def answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, 10)


@dataclass
class SentinelGroup:
    """One master, one replica and three Sentinels. ``nodes`` holds both data servers; which one
    is the master changes with each failover (:meth:`master`)."""

    directory: Path
    nodes: list[RedisProcess] = field(default_factory=list)
    sentinels: list[SentinelProcess] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        require_debian_redis()
        master = self._node("master")
        master.start()
        replica = self._node("replica", replicaof=master.port)
        replica.start()
        wait_for(lambda: self._link_up(replica), 15, "the replica to sync")
        for i in range(3):
            self.sentinels.append(SentinelProcess(self.directory / f"sentinel-{i}", master.port).start())
        wait_for(self._sentinels_agree, 30, "the Sentinels to see the replica and each other")
        return self

    def _node(self, name: str, replicaof: int | None = None) -> RedisProcess:
        args = ["--masterauth", DATA_PASSWORD, "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(replicaof)]
        node = RedisProcess(
            directory=self.directory / name,
            password=DATA_PASSWORD,
            extra_args=tuple(args),
            binary=DEBIAN_REDIS_SERVER,
        )
        self.nodes.append(node)
        return node

    @staticmethod
    def _link_up(node: RedisProcess) -> bool:
        with node.client() as client:
            info = client.info("replication")
        return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
            flat = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
            if int(flat["num-slaves"]) < 1 or int(flat["num-other-sentinels"]) < 2:
                return False
        return True

    @property
    def addresses(self) -> str:
        """``REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """The settings that make a chronoq process find the master through these Sentinels."""
        return {
            "REDIS_SENTINELS": self.addresses,
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
            "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
            "REDIS_PASSWORD": DATA_PASSWORD,
        }

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                return int(port)
            except (redis.RedisError, OSError):
                continue
        raise AssertionError("no Sentinel answered")

    def master(self) -> RedisProcess:
        port = self.master_port()
        return next(node for node in self.nodes if node.port == port)

    def replica(self) -> RedisProcess:
        port = self.master_port()
        return next(node for node in self.nodes if node.port != port)

    def kill_master(self) -> tuple[RedisProcess, float]:
        """SIGKILL the master; return it and when (epoch s)."""
        master = self.master()
        killed_at = time.time()
        master.kill()
        return master, killed_at

    def failover(self) -> float:
        """``SENTINEL FAILOVER`` (graceful: the master is alive); return when (epoch s)."""
        with self.sentinels[0].client() as client:
            started = time.time()
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        return started

    def wait_promoted(self, old_port: int, timeout_s: float = 30) -> RedisProcess:
        """Wait until every Sentinel names another master and that server answers as one."""

        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    ports.add(int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            node = next(n for n in self.nodes if n.port in ports)
            with node.client() as client:
                return bool(client.info("replication").get("role") == "master")

        wait_for(promoted, timeout_s, "a replica to be promoted")
        return self.master()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.kill()
