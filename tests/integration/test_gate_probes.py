"""Keepalives, zero-window probes and challenge ACKs of a guarded flow (lab, MTU 1500), checked by a
capture on the gateway: while the peer's last bytes are read but not committed, each leaves with
its ack clamped to the committed sequence, a correct checksum (the origin computes checksums in
software, the peer verifies them: its TcpInCsumErrors stays put) and a right edge that never
moves back; and the connection survives each (no RST, every byte intact in both directions).
Each test runs once per gate backend the kernel has (tests/conftest.py): the eBPF gate rewrites
these segments at tc egress, the patched kernel builds them clamped."""

from __future__ import annotations

import itertools
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernel import repair
from kernel.bpf.layout import Flow
from kernel.gatebackend import Gate, open_gate, socket_flow
from kernel.seq import seq_diff
from ops import gatelab as G
from ops import netns
from ops.lab import Lab
from tests.integration import gatepackets as P

HELD, COMMITTED = 6000, 2000  # the peer's first bytes: all read, only COMMITTED committed
ACK, SYN, RST = 0x10, 0x02, 0x04
_ports = itertools.count(5700)


@dataclass
class Held:
    """A guarded connection whose peer bytes beyond `committed` are read but not committed."""

    lab: Lab
    gate: Gate
    flow: Flow
    conn: socket.socket  # origin side
    peer: socket.socket
    base: int  # the gate's committed sequence at the SYN-ACK
    committed: int
    kernel_ack: int  # what the origin's kernel has received: base + HELD
    rcv_wscale: int
    snd_nxt: int  # the origin has sent no data: its ACKs carry this, a keepalive one less
    pcap: Path
    capture: subprocess.Popen[bytes]
    csum_errors_before: int

    @property
    def port(self) -> int:
        return self.flow.local_port

    def stop_capture(self) -> None:
        if self.capture.poll() is None:
            G.stop_capture(self.capture)


def _connect(service: str, port: int, rcvbuf: int | None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect((service, port))
    return s



def _pattern(n: int, salt: int) -> bytes:
    return bytes((i * 7 + salt) % 251 for i in range(n))


@pytest.fixture
def held_factory(lab: Lab, tmp_path: Path, gate_backend: str
                 ) -> Iterator[Callable[..., Held]]:
    """Makes one Held connection (peer receive buffer as asked) with a gateway capture running;
    everything is closed and restored at teardown."""
    made: list[tuple[Held, socket.socket]] = []
    lab.run("origin", ["ethtool", "-K", "eth0", "tx", "off"], check=True, capture_output=True)

    def make(peer_rcvbuf: int | None = None) -> Held:
        port = next(_ports)
        gate = open_gate("eth0", backend=gate_backend, netns=lab.netns("origin"))
        srv = lab.call("origin", G.listener, 4, port)
        gate.guard_listen(srv)
        accept = lab.submit("origin", srv.accept)
        peer = lab.call("peer", _connect, lab.service(4), port, peer_rcvbuf)
        conn, _ = accept.result(timeout=10)
        conn.settimeout(10)
        base = gate.committed_seq(conn)
        assert base is not None
        peer.sendall(_pattern(HELD, 1))
        assert G.recv_exactly(conn, HELD) == _pattern(HELD, 1)
        gate.commit(conn, base + COMMITTED)
        time.sleep(0.05)
        ici = repair.dump(conn)  # leaves repair mode without a window probe
        assert ici.rcv_nxt == (base + HELD) & 0xFFFFFFFF
        pcap = tmp_path / f"probe-{port}.pcap"
        cap = G.start_capture(netns.command(lab.netns("gw"), []), "p-origin", pcap,
                              f"tcp port {port}")
        h = Held(lab, gate, socket_flow(conn), conn, peer, base,
                 (base + COMMITTED) & 0xFFFFFFFF, ici.rcv_nxt, ici.params.rcv_wscale,
                 ici.snd_nxt, pcap, cap,
                 G.nstat(lab.run, "peer", "TcpInCsumErrors"))
        made.append((h, srv))
        return h

    try:
        yield make
    finally:
        for h, srv in made:
            h.stop_capture()
            for s in (h.conn, h.peer, srv):
                s.close()
            h.gate.close()
        lab.run("origin", ["ethtool", "-K", "eth0", "tx", "on"], capture_output=True)


@dataclass(frozen=True, slots=True)
class Wire:
    """The capture, split: origin->peer segments with their raw frames, and peer->origin."""

    origin: list[tuple[G.Captured, bytes, bool]]
    peer: list[G.Captured]


def _wire(h: Held) -> Wire:
    segs = list(G.read_pcap(h.pcap))
    frames = [(f, complete) for _, f, complete in G.read_pcap_frames(h.pcap)]
    tcp_frames = [fc for fc in frames if struct.unpack_from("!H", fc[0], 12)[0] == 0x0800]
    assert len(tcp_frames) == len(segs)
    origin = [(s, f, c) for s, (f, c) in zip(segs, tcp_frames, strict=True)
              if s.sport == h.port]
    return Wire(origin, [s for s in segs if s.dport == h.port])


def _assert_clamped_checksummed_edge_kept(h: Held, wire: Wire) -> None:
    ws = h.rcv_wscale
    edge: int | None = None  # the right edge of the first segment captured
    for seg, frame, complete in wire.origin:
        assert not seg.flags & RST, seg
        assert seg.flags & ACK and seg.ack == h.committed, seg
        # data segments are captured truncated (headers only); every segment without data whole
        assert complete or seg.payload_len > 0, seg
        assert not complete or P.tcp_checksum_valid(frame), seg
        e = (seg.ack + (seg.window << ws)) & 0xFFFFFFFF
        assert edge is None or seq_diff(e, edge) >= 0, \
            f"right edge moved back from {edge} to {e}: {seg}"
        edge = e
    assert G.nstat(h.lab.run, "peer", "TcpInCsumErrors") == h.csum_errors_before


def _survives(h: Held) -> None:
    """Commit everything, then bytes go both ways intact (the origin commits as it reads:
    after the backoff the peer's window holds a few segments only)."""
    assert h.gate.commit(h.conn, h.base + HELD)
    more = _pattern(10_000, 3)
    sending = h.lab.submit("peer", h.peer.sendall, more)
    got = b""
    while len(got) < len(more):
        chunk = h.conn.recv(65536)
        assert chunk, "the origin's connection ended"
        got += chunk
        h.gate.commit(h.conn, h.base + HELD + len(got))
    sending.result(timeout=10)
    assert got == more
    back = _pattern(10_000, 5)
    h.conn.sendall(back)
    assert G.recv_exactly(h.peer, len(back)) == back
    for s in (h.conn, h.peer):
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def _wait_counter(lab: Lab, host: str, counter: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        value = G.nstat(lab.run, host, counter)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_keepalives_of_a_guarded_flow_leave_clamped_and_the_connection_survives(
        held_factory: Callable[..., Held]) -> None:
    h = held_factory()
    before = G.nstat(h.lab.run, "origin", "TcpExtTCPKeepAlive")
    h.conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL):
        h.conn.setsockopt(socket.IPPROTO_TCP, opt, 1)
    # the peer retransmits its held bytes (backing off); each one restarts the idle time
    sent = _wait_counter(h.lab, "origin", "TcpExtTCPKeepAlive", before + 2, 15.0) - before
    h.conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    h.stop_capture()
    wire = _wire(h)
    keepalives = [s for s, _, _ in wire.origin
                  if s.payload_len == 0 and s.seq == (h.snd_nxt - 1) & 0xFFFFFFFF]
    assert sent >= 2 and len(keepalives) == sent
    _assert_clamped_checksummed_edge_kept(h, wire)
    _survives(h)


def _send_until_full(sock: socket.socket, data: bytes) -> int:
    """Write data without blocking until the send buffer is full; bytes written."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:sent + 65536])
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(10)
    return sent


def test_zero_window_probes_of_a_guarded_flow_leave_clamped_and_the_connection_survives(
        held_factory: Callable[..., Held]) -> None:
    h = held_factory(peer_rcvbuf=4096)
    before = G.nstat(h.lab.run, "origin", "TcpExtTCPWinProbe")
    payload = _pattern(4 << 20, 9)
    sent = _send_until_full(h.conn, payload)  # the peer does not read: its window closes
    probes = _wait_counter(h.lab, "origin", "TcpExtTCPWinProbe", before + 2, 15.0) - before
    h.stop_capture()
    wire = _wire(h)
    peer_acks = sorted((s.time, s.ack) for s in wire.peer if s.flags & ACK)
    on_wire = []
    for seg, _, _ in wire.origin:  # a probe: no data, sequence = the peer's latest ack - 1
        acked = [a for t, a in peer_acks if t < seg.time]
        if seg.payload_len == 0 and acked and seg.seq == (acked[-1] - 1) & 0xFFFFFFFF:
            on_wire.append(seg)
    assert probes >= 2 and len(on_wire) == probes
    assert any(s.window == 0 for s in wire.peer)  # the peer did close its window
    _assert_clamped_checksummed_edge_kept(h, wire)
    reader = h.lab.submit("peer", G.recv_exactly, h.peer, sent)
    assert reader.result(timeout=30) == payload[:sent]
    _survives(h)


def _inject(src: str, dst: str, sport: int, dport: int, seq: int, flags: int) -> None:
    """Send one bare TCP segment (no options, no data) from this namespace, raw."""
    seg = P.Segment(src, dst, sport, dport, seq, 0, flags, 1000)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(P.build_frame(seg)[14:], (dst, 0))


def test_challenge_acks_of_a_guarded_flow_leave_clamped_and_the_connection_survives(
        held_factory: Callable[..., Held]) -> None:
    """An in-window RST or a SYN on the established flow draws a challenge ACK (RFC 5961).
    The kernel sends at most one per 500 ms, and the gate drops a clamped ACK repeating the one
    on the wire within its holdoff (1 s) of the flow's last segment: injections are spaced so
    that some answers must leave."""
    h = held_factory()
    before = G.nstat(h.lab.run, "origin", "TcpExtTCPChallengeACK")
    f = h.flow
    injected = []
    for i in range(6):
        flags = RST if i % 2 == 0 else SYN
        injected.append(time.time())
        h.lab.call("peer", _inject, str(f.remote_addr), str(f.local_addr), f.remote_port,
                   f.local_port, (h.kernel_ack + 1000 + i) & 0xFFFFFFFF, flags)
        time.sleep(1.2)
    answered = G.nstat(h.lab.run, "origin", "TcpExtTCPChallengeACK") - before
    h.stop_capture()
    wire = _wire(h)
    bad = [s for s in wire.peer if s.flags & (RST | SYN)]
    assert len(bad) == len(injected)  # all six reached the origin's link
    answers = [s for s, _, _ in wire.origin
               if s.payload_len == 0 and any(0 <= s.time - b.time < 0.05 for b in bad)]
    assert answered >= 3 and len(answers) >= 3
    _assert_clamped_checksummed_edge_kept(h, wire)
    _survives(h)
