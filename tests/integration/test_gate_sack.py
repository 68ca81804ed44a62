"""SACK is off per guarded flow, not per namespace (lab, MTU 1500): a connection accepted on a
guarded port negotiates no SACK on either end while an unguarded one in the same namespace does,
and gated 50 MB uploads never wait for the peer's retransmission timer, on a clean path and on a
path that drops random data segments (the loss is recovered by duplicate ACKs)."""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from checkpointer.commit_policy import CommitPolicy
from kernel import repair
from kernel.bpf.layout import Flow
from kernel.gate import AckGate
from kernel.ici import TcpOption
from ops.lab import Lab
from tests.integration import gatelab as G

UPLOAD = 50_000_000
UPLOADS = 10
LOSS_ONE_IN = 4096  # about 8 of the ~34,500 data segments of an upload
_ports = itertools.count(5500)


def _connect(family: int, service: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((service, port))
    return s


_TCPI_OPT_SACK = 2  # include/uapi/linux/tcp.h


def _sack(sock: socket.socket) -> bool:
    """Whether the connection negotiated SACK: tcpi_options of TCP_INFO, the field `ss -ti`
    prints as "sack" (the iproute2 6.1 ss here prints no options at all on this kernel)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return bool(info[5] & _TCPI_OPT_SACK)


@pytest.mark.parametrize("family", [4, 6])
def test_guarded_port_negotiates_no_sack_while_an_unguarded_port_in_the_namespace_does(
        lab: Lab, family: int) -> None:
    guarded, unguarded = next(_ports), next(_ports)
    service = lab.service(family)
    sack_sysctl = lab.sysctl_get("origin", "net.ipv4.tcp_sack")
    with AckGate("eth0", netns=lab.netns("origin")) as gate:
        gate.guard_listen(guarded)
        servers = [lab.call("origin", G.listener, family, p) for p in (guarded, unguarded)]
        try:
            clients = [lab.call("peer", _connect, family, service, p)
                       for p in (guarded, unguarded)]
            conns = [srv.accept()[0] for srv in servers]
            peer_sack = [_sack(c) for c in clients]
            origin_sack = [_sack(c) for c in conns]
            sysctl_while_guarded = lab.sysctl_get("origin", "net.ipv4.tcp_sack")
            for s in clients:  # abort: a FIN's ACK would be held, its retransmission
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for s in clients + conns:  # would count as a timeout in the next tests
                s.close()
        finally:
            for srv in servers:
                srv.close()
    assert peer_sack == [False, True]
    assert origin_sack == [False, True]
    assert sysctl_while_guarded == sack_sysctl == "1"


@pytest.fixture
def peer_sends_single_segments(lab: Lab) -> Iterator[None]:
    """No TSO/GSO at the peer, so the lossy link drops one segment, not a 64 KB burst."""
    lab.run("peer", ["ethtool", "-K", "eth0", "tso", "off", "gso", "off"], check=True,
            capture_output=True)
    try:
        yield
    finally:
        lab.run("peer", ["ethtool", "-K", "eth0", "tso", "on", "gso", "on"], capture_output=True)


@dataclass(frozen=True, slots=True)
class PeerCounters:
    """The peer's (sender's) TCP counters over a run of uploads."""

    timeouts: int
    reno_recoveries: int
    sack_recoveries: int
    retrans_segs: int


_COUNTERS = ("TcpExtTCPTimeouts", "TcpExtTCPRenoRecovery", "TcpExtTCPSackRecovery",
             "TcpRetransSegs")


def _peer_counters(lab: Lab) -> PeerCounters:
    return PeerCounters(*(G.nstat(lab.run, "peer", c) for c in _COUNTERS))


def _delta(after: PeerCounters, before: PeerCounters) -> PeerCounters:
    return PeerCounters(after.timeouts - before.timeouts,
                        after.reno_recoveries - before.reno_recoveries,
                        after.sack_recoveries - before.sack_recoveries,
                        after.retrans_segs - before.retrans_segs)


def gated_uploads(lab: Lab, count: int, *, mid_connection: bool = False,
                  policy: CommitPolicy | None = None) -> list[G.Received]:
    """count gated 50 MB uploads from the peer, each checked intact. mid_connection: the port is
    not guarded (SACK negotiated) and each flow is guarded right after accept."""
    results = []
    for _ in range(count):
        port = next(_ports)
        with AckGate("eth0", netns=lab.netns("origin")) as gate:
            if not mid_connection:
                gate.guard_listen(port)
            srv = lab.call("origin", G.listener, 4, port)
            try:
                out = G.Received()
                if mid_connection:
                    fut = lab.submit("origin", _guard_then_read, srv, gate,
                                     policy or CommitPolicy(), out)
                else:
                    fut = lab.submit("origin", G.receive_gated, srv, gate,
                                     policy or CommitPolicy(), out, 120.0)
                client = lab.run("peer", G.uploader_argv(lab.service(4), port, UPLOAD,
                                                         wait_for_go=mid_connection),
                                 capture_output=True, text=True, timeout=180)
                got = fut.result(timeout=180)
            finally:
                srv.close()
        assert client.returncode == 0, client.stderr
        assert (got.nbytes, got.sha256) == (UPLOAD, G.expected_sha256(UPLOAD))
        assert client.stdout.strip() == got.sha256
        results.append(got)
    return results


def _guard_then_read(srv: socket.socket, gate: AckGate, policy: CommitPolicy,
                     out: G.Received) -> G.Received:
    srv.settimeout(60)
    conn, peer = srv.accept()
    flow = Flow.of(conn.getsockname()[:2], peer[:2])
    ici = repair.dump(conn)
    assert ici.params.options & TcpOption.SACK, "expected SACK negotiated on an unguarded port"
    gate.guard(flow, ici.rcv_nxt, ici.params.rcv_wscale)
    conn.sendall(b"g")
    return G.read_gated(conn, flow, ici.rcv_nxt, gate, policy, out)


def test_gated_uploads_on_a_clean_path_never_wait_for_the_retransmission_timer(
        lab: Lab) -> None:
    before = _peer_counters(lab)
    gated_uploads(lab, UPLOADS)
    seen = _delta(_peer_counters(lab), before)
    assert seen.timeouts == 0, seen
    assert seen.sack_recoveries == 0, seen


def test_gated_uploads_recover_most_random_losses_by_duplicate_acks_not_the_timer(
        lab: Lab, peer_sends_single_segments: None) -> None:
    """With SACK negotiated and its blocks stripped every loss waited for the timer (measured:
    78-82 timeouts in 10 uploads); without SACK the peer repairs them by fast retransmit, helped
    by the duplicate ACKs a commit reaching a hole repeats. A retransmission lost again still
    waits for the timer, as it does ungated."""
    before = _peer_counters(lab)
    with G.LossyLink(lab.netns("gw"), "p-origin", LOSS_ONE_IN):
        gated_uploads(lab, UPLOADS)
    seen = _delta(_peer_counters(lab), before)
    assert seen.retrans_segs >= UPLOADS, seen  # the link did lose segments
    assert seen.reno_recoveries > 0 and seen.sack_recoveries == 0, seen
    assert seen.timeouts * 8 < seen.reno_recoveries, seen
