"""The checkpointer daemon in the lab: a real agent process in the origin, real Redis in a store
host, an application committing through the library, a peer uploading; checked in the store
and on the wire at the gateway (outside the origin)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from checkpointer import api
from checkpointer.api import ApiError, Contract, ErrorCode
from checkpointer.client import AsyncCheckpointer, Checkpointer, Guarded
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


@pytest.fixture
def setup(lab: Lab, redis_store: RedisServer, tmp_path: Path,
          gate_backend: str) -> Iterator[Setup]:
    keys = write_keys(tmp_path / "keys.json")
    port = next(_ports)
    agent = AgentProcess(lab, "origin", store_url=redis_store.url, keys=keys,
                         guard=[port], workdir=tmp_path, backend=gate_backend,
                         origin=f"o{port}", metrics_port=port + 1000)
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
    """Commit, waiting out the agent's UNAVAILABLE (store partitioned: flows frozen); any
    other refusal is raised at once."""
    def settled() -> tuple[ApiError | None] | None:
        """(None,) once committed, (error,) once refused for good, None while UNAVAILABLE."""
        try:
            g.commit(state, consumed=consumed, end_of_stream=end_of_stream)
        except ApiError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE:
                return (exc,)
            out.errors.append(exc.code.name)
            return None
        return (None,)
    outcome = wait_until(settled, 60, what="a commit the agent accepts")
    assert outcome is not None
    (refused,) = outcome
    if refused is not None:
        raise refused


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
        assert record is not None
        metrics = setup.agent.metrics()
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
    p = "tcpcp_checkpointer_"
    assert metrics[p + "commits_total"] >= len(out.commits) + 1
    assert metrics[p + 'lease_state{state="held"}'] == 1
    assert metrics[p + "guarded_connections"] == 1
    assert metrics[p + "commit_latency_seconds_count"] == metrics[p + "commits_total"]
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


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_agent_killed_and_restarted_under_load_acknowledges_nothing_uncommitted(
        setup: Setup, tmp_path: Path, how: str) -> None:
    """SIGKILL (or SIGTERM) mid-upload: the pinned gate holds the ACKs at the last commit while
    no agent runs; the restarted agent takes the gate over, the library registers the
    connection again at its next commit, and committing resumes to the end."""
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
        if how == "SIGKILL":
            setup.agent.kill()
        else:
            assert setup.agent.stop() == 0, setup.agent.log_tail()
            assert setup.agent.events("gate_left_attached")
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
            commits_frozen = len(out.commits)
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
            commits_before_heal = len(out.commits)
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
    # no commit completed while fenced (they waited or were refused, and went on after)
    assert commits_before_heal == commits_frozen
    assert (out.nbytes, out.sha256) == (total, G.expected_sha256(total))
    assert _acks_not_committed(cap.segments(), port, out, total) == []


def _raw_exchange(path: Path, frames: list[bytes], fds: list[int] | None = None,
                  hello: bool = True) -> bytes:
    """Send frames on a fresh raw connection (after a HELLO when asked) and return what the
    agent answered until it closed or went quiet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    try:
        if hello:
            s.sendall(api.encode(api.Hello((1,), "raw"), 0))
            head = s.recv(api.HEADER.size)
            s.recv(api.HEADER.unpack(head)[5])
        for i, frame in enumerate(frames):
            if fds and i == 0:
                socket.send_fds(s, [frame], fds)
            else:
                s.sendall(frame)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            s.settimeout(3)
            while chunk := s.recv(65536):
                data += chunk
                if len(data) >= api.HEADER.size and \
                        len(data) >= api.HEADER.size + api.HEADER.unpack(
                            data[:api.HEADER.size])[5]:
                    break
        return data
    finally:
        s.close()


def _error_of(answer: bytes) -> api.Error:
    _, reply = api.parse_reply(answer, api.Limits(), None if answer[4] == 0 else answer[4])
    assert isinstance(reply, api.Error), reply
    return reply


def test_each_bad_input_is_refused_clearly_while_another_connection_keeps_committing(
        setup: Setup, tmp_path: Path) -> None:
    lab, port, total = setup.lab, setup.agent.port, 6_000_000  # type: ignore[attr-defined]
    path = setup.agent.socket_path
    out, release = Sink(), threading.Event()
    fut = lab.submit("origin", committing_sink, path, port, out, release, 65536, 0.01)
    uploader = lab.popen("peer", G.uploader_argv(lab.service(4), port, total),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: out.nbytes > 300_000, 60, what="the good connection committing")
        v = 1
        refusals: dict[str, api.Error] = {}
        before = len(out.commits)
        refusals["garbage"] = _error_of(_raw_exchange(path, [b"GET / HTTP/1.1\r\n\r\n"]))
        huge = api.HEADER.pack(api.MAGIC, v, api.Kind.COMMIT, 0, 7, 1 << 30)
        refusals["oversized"] = _error_of(_raw_exchange(path, [huge]))
        refusals["unknown id"] = _error_of(_raw_exchange(
            path, [api.encode(api.Commit(424242, b"", 0, 0), 9, v)]))
        r, w = os.pipe()
        try:
            refusals["a pipe"] = _error_of(_raw_exchange(
                path, [api.encode(api.RegisterConnection(0, 0, Contract.REGENERABLE), 3, v)],
                [r]))
        finally:
            os.close(r)
            os.close(w)

        def in_origin(kind: str) -> api.Error:
            if kind == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            elif kind == "unconnected":
                s = socket.socket()  # a TCP socket neither connected nor listening
            else:  # a listener on a port nobody guards
                s = G.listener(4, 5998)
            try:
                req = api.RegisterListener(Contract.REGENERABLE) if kind == "unguarded" \
                    else api.RegisterConnection(0, 0, Contract.REGENERABLE)
                return _error_of(_raw_exchange(path, [api.encode(req, 4, v)], [s.fileno()]))
            finally:
                s.close()
        for kind in ("udp", "unconnected", "listener as connection", "unguarded"):
            refusals[kind] = lab.call("origin", in_origin, kind)
        # a client that hangs up in the middle of a frame
        half = api.encode(api.Commit(1, b"x" * 100, 0, 0), 5, v)[:30]
        assert _raw_exchange(path, [half]) == b""

        # a client whose uid is not allowed (SO_PEERCRED)
        def as_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)
        nobody = subprocess.run(
            ["/usr/bin/python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
             f"s.connect({str(path)!r}); s.settimeout(5); sys.stdout.buffer.write(s.recv(2000))"],
            capture_output=True, preexec_fn=as_nobody, timeout=30)
        refusals["uid"] = _error_of(nobody.stdout)
        during = len(out.commits) - before
        _, err = uploader.communicate(timeout=120)
        assert uploader.returncode == 0, err
        release.set()
        fut.result(timeout=60)
    finally:
        release.set()
        uploader.kill()
    codes = {k: e.code for k, e in refusals.items()}
    assert codes == {"garbage": ErrorCode.MALFORMED, "oversized": ErrorCode.TOO_LARGE,
                     "unknown id": ErrorCode.UNKNOWN_CONNECTION,
                     "a pipe": ErrorCode.NOT_A_SOCKET, "udp": ErrorCode.NOT_TCP,
                     "unconnected": ErrorCode.BAD_STATE,
                     "listener as connection": ErrorCode.BAD_STATE,
                     "unguarded": ErrorCode.NOT_GUARDED,
                     "uid": ErrorCode.NOT_AUTHORISED}, refusals
    for e in refusals.values():
        assert "expected" in e.message, e.message
    assert during > 0, "the good connection made no commit while the bad inputs came"
    assert (out.nbytes, out.sha256) == (total, G.expected_sha256(total))
    assert setup.agent.proc is not None and setup.agent.proc.poll() is None


def async_echo_server(path: Path, port: int, conns: int, stop: threading.Event) -> list[int]:
    """In the origin: an asyncio server that guards `conns` connections and, for each line it
    reads, commits (state: lines seen) and echoes it back (regenerable: the echo is the input).
    Returns the number of lines each connection committed."""
    async def main() -> list[int]:
        lst = G.listener(4, port)
        lst.setblocking(False)
        counts: list[int] = []
        async with AsyncCheckpointer(path, name="async-echo") as cp:
            await cp.guard_listener(lst)
            loop = asyncio.get_running_loop()

            async def serve(conn: socket.socket) -> None:
                conn.setblocking(False)
                g = await cp.guard(conn)
                lines = consumed = 0
                while True:
                    data = await loop.sock_recv(conn, 65536)
                    if not data:
                        await g.commit(b"%d" % lines, consumed=consumed, end_of_stream=True)
                        break
                    consumed += len(data)
                    lines += data.count(b"\n")
                    await g.commit(b"%d" % lines, consumed=consumed,
                                   produced=g.produced + len(data))
                    await loop.sock_sendall(conn, data)
                counts.append(lines)
                await g.close()
                conn.close()
            tasks = []
            for _ in range(conns):
                conn, _ = await loop.sock_accept(lst)
                tasks.append(asyncio.create_task(serve(conn)))
            lst.close()
            await asyncio.gather(*tasks)
        return counts
    return asyncio.run(main())


ECHO_CLIENT = r"""
import socket, sys, threading
host, port, n, lines = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bad = []
def one(i):
    s = socket.create_connection((host, port), timeout=60)
    f = s.makefile("rb")
    for j in range(lines):
        msg = b"conn %d line %d\n" % (i, j)
        s.sendall(msg)
        if f.readline() != msg:
            bad.append((i, j))
    s.shutdown(socket.SHUT_WR)
    assert f.read() == b""
    s.close()
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print("bad", len(bad))
sys.exit(1 if bad else 0)
"""


def test_an_asyncio_server_commits_many_connections_at_once_through_one_client(
        setup: Setup) -> None:
    lab, port = setup.lab, setup.agent.port  # type: ignore[attr-defined]
    conns, lines = 20, 50
    stop = threading.Event()
    fut = lab.submit("origin", async_echo_server, setup.agent.socket_path, port, conns, stop)
    client = lab.run("peer", [sys.executable, "-c", ECHO_CLIENT, lab.service(4), str(port),
                              str(conns), str(lines)],
                     capture_output=True, text=True, timeout=180)
    assert client.returncode == 0, client.stdout + client.stderr
    counts = fut.result(timeout=60)
    assert sorted(counts) == [lines] * conns
    metrics = setup.agent.metrics()
    assert metrics["tcpcp_checkpointer_commits_total"] >= conns * (lines + 1)
