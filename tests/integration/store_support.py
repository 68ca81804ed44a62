"""Real redis-server / redis-sentinel processes on 127.0.0.1 for the store's integration tests.

Each process gets a free port and its own temporary directory and is stopped at teardown.
(The lab-wide fixtures in ops/redislab.py run Redis inside the lab's namespaces; these are
the plain local ones.)
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from ops.wait import WaitTimeout, wait_until
from store.client import CheckpointStore
from store.errors import DurabilityError, StoreUnavailable
from store.record import Checkpoint
from store.signing import KeyRing

T = TypeVar("T")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(cluster_bus: bool = False) -> int:
    """A free port; with cluster_bus, one below 55536 whose bus port (+10000) is free too."""
    if not cluster_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalRedis:
    """One redis-server (or redis-sentinel) process with its own dir and port."""

    def __init__(self, conf: dict[str, str] | None = None, *, sentinel_conf: str | None = None,
                 port: int | None = None, client_kwargs: dict[str, object] | None = None) -> None:
        self.port = port or free_port(cluster_bus="cluster-enabled" in (conf or {}))
        self.dir = Path(tempfile.mkdtemp(prefix="tcpcp-redis-"))
        self.conf = {"bind": "127.0.0.1", "port": str(self.port), "dir": str(self.dir),
                     "logfile": str(self.dir / "redis.log")}
        if sentinel_conf is None:
            self.conf.update({"save": '""', "appendonly": "no", "protected-mode": "no",
                              "repl-diskless-sync-delay": "0"})
        self.conf.update(conf or {})
        self.sentinel_conf = sentinel_conf
        self.client_kwargs = client_kwargs or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> LocalRedis:
        lines = [f"{k} {v}" for k, v in self.conf.items()]
        if self.sentinel_conf is not None:
            lines.append(self.sentinel_conf)
        conf_file = self.dir / "redis.conf"
        conf_file.write_text("\n".join(lines) + "\n")
        argv = ["redis-server", str(conf_file)]
        if self.sentinel_conf is not None:
            argv.append("--sentinel")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc = self.proc

        def answers() -> str:
            if proc.poll() is not None:
                return "exited"
            with self.admin() as c:
                return "up" if c.ping() else ""

        try:
            outcome = wait_until(answers, 10, what=f"redis on port {self.port} answering PING")
        except WaitTimeout as exc:
            raise RuntimeError(f"{exc}: {self.log()}") from exc
        if outcome == "exited":
            raise RuntimeError(f"redis exited with {proc.returncode}: "
                               f"{proc.stderr.read() if proc.stderr else b''!r} {self.log()}")
        return self

    def admin(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                           **self.client_kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "redis.log").read_text()[-2000:]
        return ""

    def kill(self) -> None:
        """SIGKILL: the crash of the host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(*servers: LocalRedis) -> Iterator[tuple[LocalRedis, ...]]:
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.close()


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """ops.wait.wait_until: on timeout, WaitTimeout chained from the predicate's last error."""
    return wait_until(predicate, timeout, what=what, interval=interval,
                      max_interval=max(interval, 0.2))


def replicas_acknowledging(primary: LocalRedis, count: int, timeout: float = 15) -> None:
    """Wait until `count` replicas acknowledge a write with WAIT (they do not for a while
    after a full sync, even when INFO already calls them online)."""
    admin = primary.admin()

    def acked() -> bool:
        admin.set("replication-probe", time.monotonic_ns())
        return int(admin.wait(count, 100)) >= count
    wait_for(acked, timeout, f"{count} replica(s) acknowledging at port {primary.port}")


def start_sentinels(primary: LocalRedis, service: str, count: int = 3,
                    down_after_ms: int = 500) -> list[LocalRedis]:
    """`count` Sentinels watching `primary` as `service` (quorum 2), once they know each other."""
    monitor = "\n".join([
        f"sentinel monitor {service} 127.0.0.1 {primary.port} 2",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} 5000",
        f"sentinel parallel-syncs {service} 1",
    ])
    sentinels = [LocalRedis(sentinel_conf=monitor) for _ in range(count)]
    try:
        for s in sentinels:
            s.start()
        for s in sentinels:
            def discovered(s: LocalRedis = s) -> bool:
                info = s.admin().execute_command("SENTINEL", "MASTER", service)
                return int(info[b"num-other-sentinels"]) == count - 1
            wait_for(discovered, 30, "sentinels discovering each other")
    except BaseException:
        for s in sentinels:
            s.close()
        raise
    return sentinels


def sentinel_master_port(sentinel: LocalRedis, service: str) -> int:
    _, port = sentinel.admin().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
    return int(port)


def start_cluster(primaries: int = 3) -> list[LocalRedis]:
    """A Redis Cluster of `primaries` primaries and no replicas; caller closes every node."""
    nodes = [LocalRedis({"cluster-enabled": "yes", "cluster-node-timeout": "2000",
                         "cluster-config-file": "nodes.conf"}) for _ in range(primaries)]
    try:
        for n in nodes:
            n.start()
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for n in nodes:
            def state_ok(n: LocalRedis = n) -> bool:
                return "cluster_state:ok" in n.admin().execute_command("CLUSTER", "INFO").decode()
            wait_for(state_ok, 20, "cluster state ok")
    except BaseException:
        for n in nodes:
            n.close()
        raise
    return nodes


def new_keyring() -> KeyRing:
    return KeyRing(sign_with="k1", keys={"k1": os.urandom(32)})


@pytest.fixture
def keyring() -> KeyRing:
    return new_keyring()


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    server = LocalRedis()
    with running(server):
        yield server


@dataclass
class FailoverRun:
    """What put_through_failover saw: the puts acknowledged, those refused (with the error),
    the put at which the failover was first seen and how many puts were attempted."""

    acknowledged: list[Checkpoint] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failed_over_at: int | None = None
    attempts: int = 0


def put_through_failover(store: CheckpointStore, make: Callable[[int], Checkpoint], *,
                         crash: Callable[[], None], failed_over: Callable[[], bool],
                         after_failover: Callable[[], object], deadline_s: float,
                         crash_at: int = 300, at_least: int = 1000) -> FailoverRun:
    """Put make(i) for i = 1, 2, ...; crash() the primary before put crash_at; go on for at
    least at_least puts and, once failed_over() says so (checked after each put past the crash;
    after_failover() then runs once), until a put after the failover is acknowledged."""
    run = FailoverRun()
    deadline = time.monotonic() + deadline_s
    while run.attempts < at_least or (
            run.failed_over_at is not None
            and not any(c.version > run.failed_over_at for c in run.acknowledged)):
        assert time.monotonic() < deadline, \
            f"no put succeeded after failover; last refusals {run.refused[-3:]}"
        run.attempts += 1
        i = run.attempts
        if i == crash_at:
            crash()
        record = make(i)
        try:
            store.put(record)
            run.acknowledged.append(record)
        except (StoreUnavailable, DurabilityError) as exc:
            run.refused.append(f"put {i}: {exc}")
            time.sleep(0.02)
        if i > crash_at and run.failed_over_at is None and failed_over():
            run.failed_over_at = i
            after_failover()
    return run
