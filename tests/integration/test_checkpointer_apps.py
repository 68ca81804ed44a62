"""The example applications (ops/apps) with the checkpointer agent in the path, driven by
programs nobody here wrote: `curl -T` against the HTTP file server, a `redis-cli` session and a
`redis-benchmark` run against the key-value server. Checked in the store (the records hold what
the application committed) and on the wire at the gateway (no ACK beyond a durable commit)."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ops.agentlab import AgentProcess, write_keys
from ops.apps.resp import ConnectionState, KvState
from ops.capture import Capture, Segment
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from store.client import CheckpointStore
from store.config import StoreConfig
from store.signing import load_keyring

SYN, ACK = 0x02, 0x10
_ports = itertools.count(5401)


@pytest.fixture(scope="module")
def redis_store(lab: Lab) -> Iterator[RedisServer]:
    srv = RedisServer(lab, "store", 6412).start()
    yield srv
    srv.stop()


@dataclass
class App:
    lab: Lab
    agent: AgentProcess
    store: CheckpointStore
    port: int
    proc: subprocess.Popen[Any]
    log: Path

    def records(self) -> dict[str, Any]:
        """Every record of the agent's origin, by connection name."""
        def read() -> dict[str, Any]:
            return {r.conn: r.checkpoint for r in self.store.records(self.agent.origin)
                    if r.checkpoint is not None}
        return self.lab.call("standby", read)


def _start_app(lab: Lab, tmp_path: Path, redis_store: RedisServer, module: str,
               extra: list[str]) -> Iterator[App]:
    keys = write_keys(tmp_path / "keys.json")
    port = next(_ports)
    agent = AgentProcess(lab, "origin", store_url=redis_store.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=f"a{port}", extra=["--log-level", "debug"])
    proc = None
    try:
        agent.start()
        log = tmp_path / "app.log"
        with log.open("wb") as out:
            proc = lab.popen("origin", [sys.executable, "-m", module, "--listen",
                                        f"0.0.0.0:{port}", "--checkpointer",
                                        str(agent.socket_path), *extra],
                             stdout=out, stderr=subprocess.STDOUT,
                             env=dict(os.environ, TCPCP_LOG_FORMAT="json"))
        wait_until(lambda: proc.poll() is None and '"listening"' in log.read_text(), 30,
                   what=f"{module} listening")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis_store.url),
                         load_keyring(keys))
        try:
            yield App(lab, agent, store, port, proc, log)
        finally:
            lab.call("standby", store.close)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(20)
        agent.close()


@pytest.fixture
def fileserver(lab: Lab, tmp_path: Path, redis_store: RedisServer) -> Iterator[App]:
    root = tmp_path / "root"
    root.mkdir()
    yield from _start_app(lab, tmp_path, redis_store, "ops.apps.fileserver",
                          ["--root", str(root)])


@pytest.fixture
def kvserver(lab: Lab, tmp_path: Path, redis_store: RedisServer) -> Iterator[App]:
    yield from _start_app(lab, tmp_path, redis_store, "ops.apps.kvserver", [])


def _capture(app: App, path: Path) -> Capture:
    return Capture.in_lab(app.lab, "gw", "p-origin", f"tcp port {app.port}", snaplen=200,
                          path=path).start()


def _acks_beyond_commits(app: App, segs: list[Segment]) -> list[Segment]:
    """Origin ACKs whose ack is neither a connection's handshake nor a sequence the agent
    committed (its debug log names every one, with the registration's)."""
    allowed = {int(e["seq"]) for e in app.agent.events("committed")}
    allowed |= {int(e["commit_seq"]) for e in app.agent.events("connection_guarded")}
    allowed |= {s.ack for s in segs if s.sport == app.port and s.flags & SYN}
    return [s for s in segs if s.sport == app.port and s.flags & ACK and s.ack not in allowed]


def test_a_curl_upload_through_the_agent_is_stored_intact_and_never_acknowledged_early(
        fileserver: App, tmp_path: Path) -> None:
    app = fileserver
    data = os.urandom(12_000_000)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    cap = _capture(app, tmp_path / "gw.pcap")
    try:
        done = app.lab.run("peer", ["curl", "-sS", "--fail", "-T", str(upload),
                                    f"http://{app.lab.service(4)}:{app.port}/up.bin"],
                           capture_output=True, text=True, timeout=120)
    finally:
        cap.stop()
    assert done.returncode == 0, done.stderr + app.agent.log_tail()
    stored = tmp_path / "root" / "up.bin"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    commits = app.agent.events("committed")
    assert len(commits) > 10, "the upload was not committed as it arrived"
    assert max(int(e["consumed"]) for e in commits) > len(data)  # the body and its head
    assert _acks_beyond_commits(app, cap.segments()) == []


def test_a_redis_cli_session_and_redis_benchmark_run_through_the_agent(
        kvserver: App, tmp_path: Path) -> None:
    app = kvserver
    host, port = app.lab.service(4), str(app.port)
    cap = _capture(app, tmp_path / "gw.pcap")
    try:
        # one redis-cli session (one connection) sending 300 INCRs, the way a user pipes them
        session = app.lab.run("peer", ["redis-cli", "-h", host, "-p", port],
                              input="INCR counter\n" * 300, capture_output=True, text=True,
                              timeout=120)
        # the record of that session's connection holds the key space it committed, while it
        # is still open: read it before the benchmark's connections come and go
        bench = app.lab.run("peer", ["redis-benchmark", "-h", host, "-p", port, "-n", "3000",
                                     "-c", "10", "-t", "set,get,incr", "-q"],
                            capture_output=True, text=True, timeout=180)
        last = app.lab.run("peer", ["redis-cli", "-h", host, "-p", port, "GET", "counter"],
                           capture_output=True, text=True, timeout=30)
    finally:
        cap.stop()
    assert session.returncode == 0, session.stderr
    assert session.stdout.split() == [str(i) for i in range(1, 301)]
    assert bench.returncode == 0, bench.stderr + bench.stdout
    for test in ("SET", "GET", "INCR"):
        assert f"{test}:" in bench.stdout, bench.stdout
    assert last.stdout.strip() == "300"
    commits = app.agent.events("committed")
    assert len(commits) >= 300 + 3000  # every batch of replies was committed before it left
    assert _acks_beyond_commits(app, cap.segments()) == []


def test_the_kv_records_in_redis_hold_the_key_space_the_application_committed(
        kvserver: App, tmp_path: Path) -> None:
    app = kvserver
    host, port = app.lab.service(4), str(app.port)
    # a session that stays open (its record lives until it closes), INCRs then waits
    holder = app.lab.popen("peer", ["redis-cli", "-h", host, "-p", port],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        for i in range(1, 51):
            holder.stdin.write("INCR k\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == str(i)

        def committed_fifty() -> bool:
            for cp in app.records().values():
                kv = KvState.restore(ConnectionState.decode(cp.app_state).snapshot)
                if kv.execute((b"GET", b"k")) == b"$2\r\n50\r\n":
                    return True
            return False
        wait_until(committed_fifty, 10, what="a record whose key space has k = 50")
    finally:
        holder.stdin.close()
        holder.wait(20)
    wait_until(lambda: app.records() == {}, 15, what="the closed session's record removed")
