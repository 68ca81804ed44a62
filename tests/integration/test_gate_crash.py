"""Crash with received-but-uncommitted bytes: with the gate (each backend the kernel has), the peer
still holds every byte from the committed sequence on (its `ss -tin`), and a connection restored
on the standby from the committed state receives those bytes exactly once; without the gate the
peer has forgotten bytes that died with the origin."""

from __future__ import annotations

import dataclasses
import re
import socket

from kernel import repair
from kernel.gatebackend import Gate, open_gate, socket_flow
from kernel.quarantine import Quarantine
from kernel.sanity import RestorePolicy
from ops import gatelab as G
from ops.lab import Lab
from ops.wait import wait_until

PORT = 5500
SENT, COMMITTED, READ = 100_000, 40_000, 50_000  # held bytes stay under a cwnd


def _peer_ss(lab: Lab) -> tuple[int, int]:
    """(bytes_acked, Send-Q) of the peer's connection to the service."""
    out = lab.run("peer", ["ss", "-tin", "dst", f"{lab.service(4)}:{PORT}"], capture_output=True,
                  text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ESTAB"))
    m = re.search(r"\bbytes_acked:(\d+)", out)
    return (int(m.group(1)) if m else 0), int(line.split()[2])


def _crash_with_held_bytes(lab: Lab, gate: Gate | None) -> tuple[int, int]:
    """Peer sends SENT bytes; origin reads READ, committing COMMITTED as it reads (gate None:
    ungated); crash the origin; returns the peer's (bytes_acked, Send-Q)."""
    with G.guarded_connection(lab, gate, PORT) as (conn, peer, base):
        sender = lab.submit("peer", peer.sendall, b"p" * SENT)
        assert (base is not None) == (gate is not None)
        got = 0
        while got < COMMITTED:  # commits keep pace with the data (DESIGN.md section 4)
            chunk = conn.recv(min(4096, COMMITTED - got))
            assert chunk, "peer closed early"
            got += len(chunk)
            if gate is not None and base is not None:
                gate.commit(conn, base + got)
        # received by the origin's kernel and read, but never committed
        assert len(G.recv_exactly(conn, READ - COMMITTED)) == READ - COMMITTED
        # an ACK of the read bytes (ungated: the proof; gated: the bug) leaves within the
        # delayed-ACK timer (40-200 ms): no event marks "it would have left by now"
        G.observe_for(0.3)
        lab.crash("origin")  # at the gateway: nothing reaches the peer from now on
        sender.result(timeout=10)  # every byte is in the peer's socket: Send-Q counts the rest
        return _peer_ss(lab)


def test_after_origin_crash_the_peer_holds_every_byte_from_the_committed_sequence_on(
        fresh_lab: Lab, gate_backend: str) -> None:
    with open_gate("eth0", backend=gate_backend, netns=fresh_lab.netns("origin")) as gate:
        acked, held = _crash_with_held_bytes(fresh_lab, gate)
    assert (acked, held) == (1 + COMMITTED, SENT - COMMITTED)  # bytes_acked counts the SYN


def test_without_a_gate_the_crashed_origin_took_read_bytes_the_peer_no_longer_holds(
        fresh_lab: Lab) -> None:
    acked, held = _crash_with_held_bytes(fresh_lab, None)
    assert acked >= 1 + READ and held <= SENT - READ


def _pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_connection_restored_from_the_committed_state_receives_the_held_bytes_exactly_once(
        fresh_lab: Lab, gate_backend: str) -> None:
    lab = fresh_lab
    stream = _pattern(SENT)
    with open_gate("eth0", backend=gate_backend, netns=lab.netns("origin")) as gate, \
            G.guarded_connection(lab, gate, PORT) as (conn, peer, base):
        assert base is not None
        flow = socket_flow(conn)
        sender = lab.submit("peer", peer.sendall, stream)
        origin_data = b""
        while len(origin_data) < COMMITTED:
            chunk = conn.recv(min(4096, COMMITTED - len(origin_data)))
            assert chunk, "peer closed early"
            origin_data += chunk
            gate.commit(conn, base + len(origin_data))
        # the checkpoint: the endpoint as of the commit, nothing received after it
        ici = repair.dump(conn)
        committed = (base + COMMITTED) & 0xFFFFFFFF
        checkpoint = dataclasses.replace(
            ici, rcv_nxt=committed, received=b"",
            window=dataclasses.replace(ici.window, rcv_wup=committed, snd_wl1=committed))
        origin_data += G.recv_exactly(conn, READ - COMMITTED)  # read, never committed
        G.observe_for(0.3)  # as above: an ACK beyond the commit would have left by now
        lab.crash("origin")
    assert origin_data == stream[:READ]

    with Quarantine("eth0", netns=lab.netns("standby")) as q:
        q.observe(flow)
        lab.switch_route("standby")
        # the peer's retransmission timer brings its next segment
        wait_until(lambda: q.observed(flow), 10, what="the peer's segment in quarantine")
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
