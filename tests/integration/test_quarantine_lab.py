"""Quarantine in the lab: the service moves to the standby, which has no socket for the flow yet.
With the flow quarantined the standby sends nothing (no RST) and records the peer's latest segment,
whose values match the peer's own state (`ss -tin` in the peer, and the capture on the gateway)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from kernel.bpf.layout import Flow
from kernel.quarantine import Observation, Quarantine
from ops import gatelab as G
from ops import netns, tcpoptions
from ops.lab import Lab

PORT = 5400
SYN, RST = 0x02, 0x04


def _connect(service: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((service, PORT))
    return s



def _switch_mid_connection(lab: Lab, pcap: Path, quarantine: Quarantine | None
                           ) -> tuple[Flow, Observation | None, str, list[G.Captured], float]:
    """Connect peer->origin, exchange bytes, move the service to the standby, let the peer send
    700 more bytes for a second. Returns the flow, what quarantine saw, the peer's `ss -tin`,
    the capture on the peer's link and the switch time."""
    cap = G.start_capture(netns.command(lab.netns("gw"), []), "v-peer", pcap,
                          f"tcp port {PORT}")
    srv = lab.call("origin", G.listener, 4, PORT)
    try:
        accept = lab.submit("origin", srv.accept)
        peer = lab.call("peer", _connect, lab.service(4))
        conn, addr = accept.result(timeout=10)
        flow = Flow.of(conn.getsockname()[:2], addr[:2])
        peer.sendall(b"x" * 1000)
        assert len(G.recv_exactly(conn, 1000)) == 1000
        conn.sendall(b"y" * 500)
        assert len(G.recv_exactly(peer, 500)) == 500
        time.sleep(0.1)  # delayed ACKs settle
        if quarantine is not None:
            quarantine.observe(flow)
        switched = time.time()
        lab.switch_route("standby")
        peer.sendall(b"z" * 700)
        time.sleep(1.0)
        seen = quarantine.observed(flow) if quarantine is not None else None
        ss = lab.run("peer", ["ss", "-tin", "dst", f"{lab.service(4)}:{PORT}"],
                     capture_output=True, text=True, check=True).stdout
    finally:
        G.stop_capture(cap)
        srv.close()
    return flow, seen, ss, list(G.read_pcap(pcap)), switched


def _ss_field(ss: str, name: str) -> int:
    m = re.search(rf"\b{name}:(\d+)", ss)
    assert m, f"no {name} in ss output: {ss}"
    return int(m.group(1))


def _send_q(ss: str) -> int:
    line = next(ln for ln in ss.splitlines() if ln.startswith("ESTAB"))
    return int(line.split()[2])


def test_quarantined_standby_sends_no_reset_and_records_the_peers_state(
        fresh_lab: Lab, tmp_path: Path) -> None:
    with Quarantine("eth0", netns=fresh_lab.netns("standby")) as q:
        _, seen, ss, segs, switched = _switch_mid_connection(fresh_lab, tmp_path / "q.pcap", q)
    from_service = [s for s in segs if s.sport == PORT]
    from_peer = [s for s in segs if s.dport == PORT]
    assert [s for s in from_service if s.flags & RST] == []
    assert [s for s in from_service if s.time > switched] == []
    assert seen is not None
    after_switch = [s for s in from_peer if s.time > switched]
    assert seen.packets == len(after_switch) >= 2  # the segment and at least one retransmission
    last = after_switch[-1]
    assert (seen.seq, seen.ack, seen.window, seen.tcp_flags) == (
        last.seq, last.ack, last.window, last.flags)
    assert seen.end_seq == (last.seq + last.payload_len) & 0xFFFFFFFF
    assert (seen.tsval, seen.tsecr) == tcpoptions.timestamps(last.options)

    peer_isn = next(s.seq for s in from_peer if s.flags & SYN)
    origin_isn = next(s.seq for s in from_service if s.flags & SYN)
    assert "ESTAB" in ss
    assert seen.ack == (origin_isn + 1 + _ss_field(ss, "bytes_received")) & 0xFFFFFFFF
    # bytes_acked counts the SYN; Send-Q is what the peer still holds for us
    assert seen.end_seq == (peer_isn + _ss_field(ss, "bytes_acked") + _send_q(ss)) & 0xFFFFFFFF
    assert _send_q(ss) == 700


def test_without_quarantine_the_standby_resets_the_connection(fresh_lab: Lab,
                                                              tmp_path: Path) -> None:
    _, _, _, segs, switched = _switch_mid_connection(fresh_lab, tmp_path / "r.pcap", None)
    resets = [s for s in segs if s.sport == PORT and s.flags & RST and s.time > switched]
    assert resets, "expected the standby's kernel to answer the unknown flow with RST"
