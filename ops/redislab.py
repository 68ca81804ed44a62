"""Real Redis servers inside lab hosts: standalone, primary with replicas, Sentinels, Cluster.

Each server runs `redis-server` in a lab host on its own port with its own data directory,
bound to the host's lab addresses (and loopback). `start` returns once the server answers
PING; `stop` shuts it down gracefully, `kill` SIGKILLs it (a crash).

    srv = RedisServer(lab, "store", port=6379, conf={"appendonly": "yes"}).start()
    replica = RedisServer(lab, "store2", replicaof=srv).start()
    sentinels = SentinelSet(lab, srv, ["store", "store2", "store3"]).start()
    cluster = RedisClusterSet(lab, ["store", "store2", "store3"]).start()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
import structlog

from ops import netns
from ops.lab import Lab

log = structlog.get_logger(component="tcpcp.redislab")

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisLabError(RuntimeError):
    """A lab Redis process did not start, become ready or fail over in time."""


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RedisLabError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


class _Process:
    """One redis-server (or sentinel) process in a lab host, with its own directory."""

    kind = "redis"

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        self.lab = lab
        self.host = host
        self.port = port
        self.addr = lab.addr(host, 4)
        self.addr6 = lab.addr(host, 6)
        self.dir = tempfile.mkdtemp(prefix=f"{lab.prefix}-{self.kind}-{host}-{port}-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.addr}:{self.port}"

    @property
    def conf_path(self) -> str:
        return os.path.join(self.dir, f"{self.kind}.conf")

    def _conf(self) -> dict[str, str]:
        return {
            "port": str(self.port),
            "bind": f"{self.addr} {self.addr6} 127.0.0.1",
            "protected-mode": "no",
            "daemonize": "no",
            "dir": self.dir,
            "logfile": os.path.join(self.dir, f"{self.kind}.log"),
        }

    def _write_conf(self, extra: Sequence[str] = ()) -> None:
        with open(self.conf_path, "w") as f:
            for key, value in self._conf().items():
                f.write(f"{key} {value}\n")
            for line in extra:
                f.write(line + "\n")

    def _argv(self) -> list[str]:
        return [REDIS_SERVER, self.conf_path]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client for this server; use it inside `lab.enter(host)` or `lab.call`."""
        netns.assert_inside_lab()
        return redis.Redis(host=self.addr, port=self.port, socket_timeout=2, **kwargs)

    def _ping(self) -> bool:
        c = self.client()
        try:
            return bool(c.ping())
        finally:
            c.close()

    def _launch(self, timeout: float) -> None:
        self.proc = self.lab.popen(self.host, self._argv(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            _wait(f"{self.kind} on {self.host}:{self.port}",
                  lambda: self._alive() and self.lab.call(self.host, self._ping), timeout)
        except RedisLabError as exc:
            raise RedisLabError(f"{exc}\n--- log:\n{self.log_tail()}") from None
        log.info("redis_started", kind=self.kind, host=self.host, port=self.port)

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RedisLabError(f"{self.kind} on {self.host}:{self.port} exited: "
                                f"{self.log_tail()}")
        return True

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(FileNotFoundError), \
                open(os.path.join(self.dir, f"{self.kind}.log")) as f:
                return "".join(f.readlines()[-lines:])
        return "(no log)"

    def kill(self) -> None:
        """SIGKILL the server: a crash, no shutdown save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        log.info("redis_killed", kind=self.kind, host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), then remove the data directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisServer(_Process):
    """A redis-server in a lab host; optionally a replica of another."""

    def __init__(self, lab: Lab, host: str, port: int = 6379,
                 conf: Mapping[str, str] | None = None,
                 replicaof: RedisServer | None = None) -> None:
        super().__init__(lab, host, port)
        self.extra = dict(conf or {})
        self.replicaof = replicaof

    def _conf(self) -> dict[str, str]:
        conf = super()._conf()
        conf.update({"save": '""', "appendonly": "no", "dbfilename": "dump.rdb",
                     "appenddirname": "aof", "repl-diskless-sync-delay": "0"})
        if self.replicaof is not None:
            conf["replicaof"] = f"{self.replicaof.addr} {self.replicaof.port}"
        conf.update(self.extra)
        return conf

    def start(self, timeout: float = 10.0) -> RedisServer:
        self._write_conf()
        self._launch(timeout)
        if self.replicaof is not None:
            _wait(f"replica {self.host}:{self.port} in sync",
                  lambda: self.lab.call(self.host, self._in_sync), timeout)
        return self

    def _in_sync(self) -> bool:
        """The link is up and the primary counts this replica's acknowledgements (WAIT)."""
        c = self.client()
        try:
            if c.info("replication").get("master_link_status") != "up":
                return False
        finally:
            c.close()
        assert self.replicaof is not None
        p = self.replicaof.client()
        try:
            return int(p.execute_command("WAIT", 1, 100)) >= 1
        finally:
            p.close()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start again after kill/stop with the same directory and configuration."""
        if self.running:
            raise RedisLabError(f"redis on {self.host}:{self.port} is still running")
        os.makedirs(self.dir, exist_ok=True)
        self._launch(timeout)
        return self


class SentinelSet:
    """Sentinels (one per host given) monitoring `primary` under `service`."""

    def __init__(self, lab: Lab, primary: RedisServer, hosts: Sequence[str],
                 service: str = "tcpcp", port: int = 26379, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        self.lab = lab
        self.primary = primary
        self.service = service
        self.sentinels = [_Sentinel(lab, h, port) for h in hosts]
        self.monitor = [
            f"sentinel monitor {service} {primary.addr} {primary.port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(s.addr, s.port) for s in self.sentinels]

    def start(self, timeout: float = 10.0) -> SentinelSet:
        for s in self.sentinels:
            s._write_conf(self.monitor)
            s._launch(timeout)
        return self

    def primary_address(self, via: int = 0) -> tuple[str, int]:
        s = self.sentinels[via]

        def ask() -> tuple[str, int]:
            c = s.client()
            try:
                host, port = c.execute_command("SENTINEL", "get-master-addr-by-name", self.service)
                return (host.decode(), int(port))
            finally:
                c.close()

        return self.lab.call(s.host, ask)

    def wait_failover(self, away_from: tuple[str, int], timeout: float = 30.0) -> tuple[str, int]:
        """Wait until the sentinels name a primary other than `away_from`; return it."""
        result: list[tuple[str, int]] = []

        def moved() -> bool:
            now = self.primary_address()
            if now != away_from:
                result.append(now)
                return True
            return False

        _wait(f"sentinel failover away from {away_from}", moved, timeout)
        return result[-1]

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()


class _Sentinel(_Process):
    kind = "sentinel"

    def _argv(self) -> list[str]:
        return [REDIS_SERVER, self.conf_path, "--sentinel"]


class RedisClusterSet:
    """A Redis Cluster of primaries (no replicas), one per (host, port) given."""

    def __init__(self, lab: Lab, hosts: Sequence[str], base_port: int = 7000,
                 node_timeout_ms: int = 2000) -> None:
        self.lab = lab
        self.nodes = [
            RedisServer(lab, h, base_port + i,
                        conf={"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
                              "cluster-node-timeout": str(node_timeout_ms)})
            for i, h in enumerate(hosts)
        ]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(n.addr, n.port) for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterSet:
        for n in self.nodes:
            n.start()
        first = self.nodes[0]
        r = self.lab.run(first.host, [REDIS_CLI, "--cluster", "create",
                                      *[f"{n.addr}:{n.port}" for n in self.nodes],
                                      "--cluster-replicas", "0", "--cluster-yes"],
                         capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or "[OK]" not in r.stdout:
            raise RedisLabError(f"redis-cli --cluster create failed: {r.stdout}{r.stderr}")

        def all_ok() -> bool:
            for n in self.nodes:
                c = n.client()
                try:
                    if c.cluster("info").get("cluster_state") != "ok":
                        return False
                finally:
                    c.close()
            return True

        _wait("cluster_state:ok on every node", lambda: self.lab.call(first.host, all_ok), timeout)
        log.info("redis_cluster_started", nodes=self.startup_nodes)
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
