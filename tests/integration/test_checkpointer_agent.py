"""The checkpointer daemon in the lab: a real agent process in the origin, real Redis in a store
host, an application committing through the library, a peer uploading; checked in the store
and on the wire at the gateway (outside the origin)."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from checkpointer.api import ApiError, Contract, ErrorCode
from checkpointer.client import Checkpointer, Guarded
from kernel import codec
from kernel.seq import seq_add
from ops import gatelab as G
from ops.agentlab import AgentProcess, write_keys
from ops.capture import Capture, Segment
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from store.client import CheckpointStore
from store.config import StoreConfig
from store.record import Checkpoint
from store.signing import load_keyring

SYN, ACK = 0x02, 0x10
_ports = itertools.count(5301)


@pytest.fixture(scope="module")
def redis_store(lab: Lab) -> Iterator[RedisServer]:
    srv = RedisServer(lab, "store", 6411).start()
    yield srv
    srv.stop()


@dataclass
class Setup:
    lab: Lab
    agent: AgentProcess
    store: CheckpointStore
    keys: Path


@pytest.fixture(params=["bpf"])
def setup(request: pytest.FixtureRequest, lab: Lab, redis_store: RedisServer,
          tmp_path: Path) -> Iterator[Setup]:
    keys = write_keys(tmp_path / "keys.json")
    port = next(_ports)
    agent = AgentProcess(lab, "origin", store_url=redis_store.url, keys=keys,
                         guard=[port], workdir=tmp_path, backend=request.param,
                         origin=f"o{port}")
    agent.port = port  # type: ignore[attr-defined]
    try:
        agent.start()
        # the test reads the store from the standby host (its thread lives in that namespace)
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis_store.url),
                         load_keyring(keys))
        try:
            yield Setup(lab, agent, store, keys)
        finally:
            lab.call("standby", store.close)
    finally:
        agent.close()


@dataclass
class Sink:
    """What the committing application saw."""

    nbytes: int = 0
    sha256: str = ""
    commits: list[int] = field(default_factory=list)
    conn_name: str = ""
    errors: list[str] = field(default_factory=list)


def _commit(g: Guarded, out: Sink, state: bytes, *, consumed: int,
            end_of_stream: bool = False) -> None:
    """Commit, waiting out the agent's UNAVAILABLE (store partitioned: flows frozen)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            g.commit(state, consumed=consumed, end_of_stream=end_of_stream)
            return
        except ApiError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            out.errors.append(exc.code.name)
            time.sleep(0.05)


def committing_sink(path: Path, port: int, out: Sink, before_close: threading.Event,
                    chunk: int = 1 << 20, think_s: float = 0.0) -> Sink:
    """In the origin: guard a listener, accept one connection, commit after every read of at
    most `chunk` bytes (its state: the count so far), then think_s of work; answer one byte at
    the end of stream, then wait for before_close and close through the agent."""
    lst = G.listener(4, port)
    with Checkpointer(path, name="sink") as cp:
        cp.guard_listener(lst)
        conn, _ = lst.accept()
        lst.close()
        g: Guarded = cp.guard(conn, contract=Contract.REGENERABLE, state=b"{}")
        out.conn_name = f"{conn.getsockname()[0]}:{conn.getsockname()[1]}>" \
                        f"{conn.getpeername()[0]}:{conn.getpeername()[1]}"
        digest = hashlib.sha256()
        conn.settimeout(60)
        while True:
            data = conn.recv(chunk)
            if not data:
                _commit(g, out, json.dumps({"n": out.nbytes, "end": True}).encode(),
                        consumed=out.nbytes, end_of_stream=True)
                break
            out.nbytes += len(data)
            digest.update(data)
            _commit(g, out, json.dumps({"n": out.nbytes}).encode(), consumed=out.nbytes)
            out.commits.append(out.nbytes)
            if think_s:
                time.sleep(think_s)
        out.sha256 = digest.hexdigest()
        conn.sendall(b"k")
        before_close.wait(30)
        g.close()
        conn.close()
    return out


def test_an_upload_is_committed_record_by_record_and_no_ack_passes_the_commit(
        setup: Setup, tmp_path: Path) -> None:
    lab, port, total = setup.lab, setup.agent.port, 5_000_000  # type: ignore[attr-defined]
    out, release = Sink(), threading.Event()
    cap = Capture.in_lab(lab, "gw", "p-origin", f"tcp port {port}", snaplen=200,
                         path=tmp_path / "gw.pcap").start()
    try:
        fut = lab.submit("origin", committing_sink, setup.agent.socket_path, port, out, release)
        client = lab.run("peer", G.uploader_argv(lab.service(4), port, total),
                         capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr + setup.agent.log_tail()
        # the record in Redis is the application's last commit
        record = wait_until(lambda: _record_at(setup, out, total), 30,
                            what="the last commit's record in Redis")
        release.set()
        fut.result(timeout=60)
    finally:
        release.set()
        cap.stop()
    assert (out.nbytes, out.sha256) == (total, G.expected_sha256(total))
    assert json.loads(record.app_state) == {"n": total, "end": True}
    assert record.inbound_consumed == total
    segs = cap.segments()
    syn_ack = next(s for s in segs if s.sport == port and s.flags & SYN)
    base = syn_ack.ack  # the peer's ISN + 1: stream position 0
    ici = codec.decode(record.ici)
    assert ici.rcv_nxt == seq_add(base, total + 1)  # the FIN committed too
    allowed = {base} | {seq_add(base, n) for n in out.commits} | {seq_add(base, total + 1)}
    leaked = [s for s in segs if s.sport == port and s.flags & ACK and s.ack not in allowed]
    assert leaked == [], f"ACKs of sequences never committed: {leaked[:5]}"
    assert len({s.ack for s in segs if s.sport == port}) > 10  # commits really moved the ACK
    # closing through the agent removed the record
    wait_until(lambda: _record(setup, out.conn_name) is None, 10,
               what="the closed connection's record removed")


def _record(setup: Setup, conn: str) -> Checkpoint | None:
    return setup.lab.call("standby", setup.store.get, setup.agent.origin, conn)


def _record_at(setup: Setup, out: Sink, total: int) -> Checkpoint | None:
    """The connection's record once it holds the end of stream at `total` bytes."""
    if not out.conn_name:
        return None
    rec = _record(setup, out.conn_name)
    return rec if rec is not None and rec.inbound_consumed == total \
        and b"end" in rec.app_state else None


def test_a_socket_on_an_unguarded_port_is_refused_and_the_agent_serves_on(
        setup: Setup) -> None:
    def attempt() -> str:
        lst = G.listener(4, 5999)
        try:
            with Checkpointer(setup.agent.socket_path) as cp:
                try:
                    cp.guard_listener(lst)
                except ApiError as exc:
                    assert exc.code is ErrorCode.NOT_GUARDED
                    return exc.message
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    cp.guard(udp)
                except ApiError as exc:
                    assert exc.code is ErrorCode.NOT_TCP
                return "not refused"
        finally:
            lst.close()
    message = setup.lab.call("origin", attempt)
    assert "is not guarded" in message


def _acks_not_committed(segs: list[Segment], port: int, out: Sink, total: int) -> list[Segment]:
    syn_ack = next(s for s in segs if s.sport == port and s.flags & SYN)
    base = syn_ack.ack
    allowed = {base} | {seq_add(base, n) for n in out.commits} | {seq_add(base, total + 1)}
    return [s for s in segs if s.sport == port and s.flags & ACK and s.ack not in allowed]


def test_an_agent_killed_and_restarted_under_load_acknowledges_nothing_uncommitted(
        setup: Setup, tmp_path: Path) -> None:
    """SIGKILL mid-upload: the pinned gate holds the ACKs at the last commit while no agent
    runs; the restarted agent takes the gate over, the library registers the connection
    again at its next commit, and committing resumes to the end."""
    lab, port, total = setup.lab, setup.agent.port, 20_000_000  # type: ignore[attr-defined]
    out, release = Sink(), threading.Event()
    cap = Capture.in_lab(lab, "gw", "p-origin", f"tcp port {port}", snaplen=200,
                         path=tmp_path / "gw.pcap").start()
    try:
        fut = lab.submit("origin", committing_sink, setup.agent.socket_path, port, out, release,
                         65536, 0.002)
        uploader = lab.popen("peer", G.uploader_argv(lab.service(4), port, total),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: out.nbytes > 2_000_000, 60, what="2 MB committed")
        setup.agent.kill()
        at_kill = out.nbytes
        setup.agent.start()
        _, err = uploader.communicate(timeout=120)
        assert uploader.returncode == 0, err
        release.set()
        fut.result(timeout=60)
    finally:
        release.set()
        cap.stop()
    assert (out.nbytes, out.sha256) == (total, G.expected_sha256(total))
    assert at_kill < total  # the kill happened mid-upload
    assert len(setup.agent.events("connection_guarded")) >= 2  # registered again
    assert _acks_not_committed(cap.segments(), port, out, total) == []


def test_partitioned_from_the_store_the_agent_freezes_before_the_ttl_and_recovers(
        setup: Setup, tmp_path: Path) -> None:
    lab, port, total = setup.lab, setup.agent.port, 8_000_000  # type: ignore[attr-defined]
    out, release = Sink(), threading.Event()
    cap = Capture.in_lab(lab, "gw", "p-origin", f"tcp port {port}", snaplen=200,
                         path=tmp_path / "gw.pcap").start()
    try:
        fut = lab.submit("origin", committing_sink, setup.agent.socket_path, port, out, release,
                         65536, 0.02)
        uploader = lab.popen("peer", G.uploader_argv(lab.service(4), port, total),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: out.nbytes > 500_000, 60, what="500 kB committed")
        cut = time.monotonic()
        lab.partition("origin", ["store"])
        try:
            wait_until(lambda: setup.agent.events("flows_frozen"), 10,
                       what="the agent froze its flows")
            frozen_after = time.monotonic() - cut
            assert cap.flush()
            mark = cap.mark()
            # the peer retransmits what the origin holds (its timer backs off: up to seconds);
            # an unfrozen origin would answer each retransmission within milliseconds
            cap.wait_for(lambda s: s.dport == port, since=mark, timeout=15,
                         what="a segment of the peer's while the origin is frozen")
            G.observe_for(0.5)
            assert cap.flush()
            silent = [s for s in cap.segments(since=mark) if s.sport == port]
            heard = [s for s in cap.segments(since=mark) if s.dport == port]
        finally:
            lab.heal("origin")
        wait_until(lambda: setup.agent.events("flows_thawed"), 20, what="the agent thawed")
        _, err = uploader.communicate(timeout=120)
        assert uploader.returncode == 0, err
        release.set()
        fut.result(timeout=60)
    finally:
        release.set()
        cap.stop()
    # frozen before the 2000 ms lease could run out on the store
    assert frozen_after < 2.0, frozen_after
    assert silent == [], f"the frozen origin sent {len(silent)} segments"
    assert heard, "the peer sent nothing while the origin was frozen (nothing was tested)"
    assert "UNAVAILABLE" in out.errors  # commits were refused while fenced, not lost
    assert (out.nbytes, out.sha256) == (total, G.expected_sha256(total))
    assert _acks_not_committed(cap.segments(), port, out, total) == []
