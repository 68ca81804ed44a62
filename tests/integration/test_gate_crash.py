"""Crash with received-but-uncommitted bytes: with the gate, the peer still holds every byte from
the committed sequence on (its `ss -tin`), and a connection restored on the standby from the
committed state receives those bytes exactly once; without the gate the peer has forgotten bytes
that died with the origin."""

from __future__ import annotations

import dataclasses
import re
import socket
import time

import pytest

from kernel import repair
from kernel.bpf.layout import Flow
from kernel.gate import AckGate
from kernel.quarantine import Quarantine
from kernel.sanity import RestorePolicy
from ops import gatelab as G
from ops.lab import Lab

PORT = 5500
SENT, COMMITTED, READ = 100_000, 40_000, 50_000  # held bytes stay under a cwnd


def _connect(service: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((service, PORT))
    return s



def _peer_ss(lab: Lab) -> tuple[int, int]:
    """(bytes_acked, Send-Q) of the peer's connection to the service."""
    out = lab.run("peer", ["ss", "-tin", "dst", f"{lab.service(4)}:{PORT}"], capture_output=True,
                  text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ESTAB"))
    m = re.search(r"\bbytes_acked:(\d+)", out)
    return (int(m.group(1)) if m else 0), int(line.split()[2])


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_after_origin_crash_the_peer_holds_every_byte_from_the_committed_sequence_on(
        fresh_lab: Lab, gated: bool) -> None:
    lab = fresh_lab
    with AckGate("eth0", netns=lab.netns("origin")) as gate:
        if gated:
            gate.guard_listen(PORT)
        srv = lab.call("origin", G.listener, 4, PORT)
        try:
            accept = lab.submit("origin", srv.accept)
            peer = lab.call("peer", _connect, lab.service(4))
            conn, addr = accept.result(timeout=10)
            conn.settimeout(10)
            flow = Flow.of(conn.getsockname()[:2], addr[:2])
            sender = lab.submit("peer", peer.sendall, b"p" * SENT)
            cfg = gate.config(flow)
            assert (cfg is not None) == gated
            got = 0
            while got < COMMITTED:  # commits keep pace with the data (DESIGN.md section 4)
                chunk = conn.recv(min(4096, COMMITTED - got))
                assert chunk, "peer closed early"
                got += len(chunk)
                if cfg is not None:
                    gate.commit(flow, cfg.committed_seq + got)
            # received by the origin's kernel and read, but never committed
            assert len(G.recv_exactly(conn, READ - COMMITTED)) == READ - COMMITTED
            time.sleep(0.3)
            lab.crash("origin")
            sender.result(timeout=10)
            time.sleep(0.5)
            acked, held = _peer_ss(lab)
        finally:
            srv.close()
    if gated:
        assert (acked, held) == (1 + COMMITTED, SENT - COMMITTED)  # bytes_acked counts the SYN
    else:
        assert acked >= 1 + READ and held <= SENT - READ


def _pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_connection_restored_from_the_committed_state_receives_the_held_bytes_exactly_once(
        fresh_lab: Lab) -> None:
    lab = fresh_lab
    stream = _pattern(SENT)
    with AckGate("eth0", netns=lab.netns("origin")) as gate:
        gate.guard_listen(PORT)
        srv = lab.call("origin", G.listener, 4, PORT)
        try:
            accept = lab.submit("origin", srv.accept)
            peer = lab.call("peer", _connect, lab.service(4))
            conn, addr = accept.result(timeout=10)
            conn.settimeout(10)
            flow = Flow.of(conn.getsockname()[:2], addr[:2])
            cfg = gate.config(flow)
            assert cfg is not None
            sender = lab.submit("peer", peer.sendall, stream)
            origin_data = b""
            while len(origin_data) < COMMITTED:
                chunk = conn.recv(min(4096, COMMITTED - len(origin_data)))
                assert chunk, "peer closed early"
                origin_data += chunk
                gate.commit(flow, cfg.committed_seq + len(origin_data))
            # the checkpoint: the endpoint as of the commit, nothing received after it
            ici = repair.dump(conn)
            committed = (cfg.committed_seq + COMMITTED) & 0xFFFFFFFF
            checkpoint = dataclasses.replace(
                ici, rcv_nxt=committed, received=b"",
                window=dataclasses.replace(ici.window, rcv_wup=committed))
            origin_data += G.recv_exactly(conn, READ - COMMITTED)  # read, never committed
            time.sleep(0.3)
            lab.crash("origin")
        finally:
            srv.close()
    assert origin_data == stream[:READ]

    with Quarantine("eth0", netns=lab.netns("standby")) as q:
        q.observe(flow)
        lab.switch_route("standby")
        deadline = time.monotonic() + 10
        while q.observed(flow) is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the peer's retransmission timer brings its next segment
        policy = RestorePolicy.serving(lab.service(4))
        restored = lab.call("standby", repair.restore, checkpoint, policy)
        seen = q.release(flow)
        sock = lab.call("standby", repair.activate, restored)
    assert seen is not None and seen.seq == committed  # the peer resends from the commit on
    sender.result(timeout=20)
    lab.call("peer", peer.shutdown, socket.SHUT_WR)
    sock.settimeout(20)
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    assert rest == stream[COMMITTED:]  # every held byte, once, in order
    sock.close()
    peer.close()
