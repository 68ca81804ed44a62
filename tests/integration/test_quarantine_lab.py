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
from kernel.repair import tcp_info
from ops import gatelab as G
from ops import tcpoptions
from ops.capture import Capture, Segment
from ops.lab import Lab
from ops.wait import wait_until

PORT = 5400
SYN, RST = 0x02, 0x04


def _connect(service: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((service, PORT))
    return s



def _switch_mid_connection(lab: Lab, pcap: Path, quarantine: Quarantine | None
                           ) -> tuple[Flow, Observation | None, str, list[Segment], float]:
    """Connect peer->origin, exchange bytes, move the service to the standby, let the peer send
    700 more bytes (retransmitted when quarantined, answered by the standby when not). Returns
    the flow, what quarantine saw, the peer's `ss -tin`, the capture on the peer's link (up to
    the quarantine's reading) and the switch time."""
    cap = G.gateway_capture(lab, f"tcp port {PORT}", "v-peer", pcap).start()
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
        # delayed ACKs settle: neither end has a segment waiting for its ACK
        wait_until(lambda: tcp_info(peer).tcpi_unacked == tcp_info(conn).tcpi_unacked == 0, 10,
                   what="both ends' bytes acknowledged")
        if quarantine is not None:
            quarantine.observe(flow)
        switched = time.time()
        lab.switch_route("standby")
        peer.sendall(b"z" * 700)
        if quarantine is not None:  # the 700 bytes and a retransmission cross the peer's link
            wait_until(lambda: len([s for s in cap.segments()
                                    if s.dport == PORT and s.payload_len == 700]) >= 2, 10,
                       what="the peer's 700 bytes sent and retransmitted")
        else:  # the standby's kernel answers them
            cap.wait_for(lambda s: s.sport == PORT and s.at > switched, what="the standby's answer")
        got = wait_until(lambda: _same_window(cap, quarantine, flow, switched), 10,
                         what="quarantine and capture covering the same segments")
        assert got is not None
        seen, segs = got
        ss = lab.run("peer", ["ss", "-tin", "dst", f"{lab.service(4)}:{PORT}"],
                     capture_output=True, text=True, check=True).stdout
    finally:
        cap.stop()
        srv.close()
    return flow, seen, ss, segs, switched


def _same_window(cap: Capture, quarantine: Quarantine | None, flow: Flow, switched: float
                 ) -> tuple[Observation | None, list[Segment]] | None:
    """(quarantine's record, the capture) read so that both cover the same segments: the record
    is read before and after flushing the capture and must not change in between, and a
    segment captured on the gateway must have reached the standby (None: not yet, read again).
    The peer's next retransmission is hundreds of milliseconds away, so this settles."""
    before = quarantine.observed(flow) if quarantine is not None else None
    assert cap.flush(), "the capture's flush marker did not come back"
    segs = cap.segments()
    after = quarantine.observed(flow) if quarantine is not None else None
    if before != after:
        return None
    if after is not None and after.packets != len(
            [s for s in segs if s.dport == PORT and s.at > switched]):
        return None
    return after, segs


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
    assert [s for s in from_service if s.at > switched] == []
    assert seen is not None
    after_switch = [s for s in from_peer if s.at > switched]
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
    resets = [s for s in segs if s.sport == PORT and s.flags & RST and s.at > switched]
    assert resets, "expected the standby's kernel to answer the unknown flow with RST"


def test_two_quarantines_share_an_interface_each_passing_on_what_is_not_its_own(
        fresh_lab: Lab, tmp_path: Path) -> None:
    """Two resurrectors on one standby: the first quarantine (empty, attached first, so it runs
    first) must leave the flow to the second, which drops and records it; had the first passed
    the packet outright (TC_ACT_OK), the standby's kernel would answer the peer with a RST."""
    ns = fresh_lab.netns("standby")
    with Quarantine("eth0", netns=ns) as first, Quarantine("eth0", netns=ns) as second:
        assert first.priority < second.priority
        _, seen, _, segs, switched = _switch_mid_connection(fresh_lab, tmp_path / "q2.pcap",
                                                            second)
    assert [s for s in segs if s.sport == PORT and s.at > switched] == []
    assert seen is not None and seen.packets >= 2
