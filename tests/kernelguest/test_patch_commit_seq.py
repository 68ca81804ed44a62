"""TCP_COMMIT_SEQ on the patched guest kernel, seen on the wire of a veth pair at MTU 1500.

The origin (server) holds its ACKs; the peer (client) is an ordinary socket. Segments are
captured on the peer's side, i.e. what the peer actually receives.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import patch_gate
from kernel.patch_gate import CommitRefused, PatchGate
from kernel.seq import after, seq_add, seq_diff
from ops.capture import Capture
from ops.gatelab import recv_exactly
from ops.kernel.guestnet import (
    TCP_FIN,
    TCP_INFO_STATE_CLOSE,
    TCP_INFO_STATE_FIN_WAIT1,
    TCP_INFO_STATE_FIN_WAIT2,
    TCP_INFO_STATE_LAST_ACK,
    TCP_SYN,
    VethPair,
    background,
    inject,
    run_in,
    tcp_state,
)
from ops.wait import wait_until


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with VethPair() as p:
        yield p


def test_the_kernel_reports_the_commit_option_present() -> None:
    assert patch_gate.commit_option_present()
    assert patch_gate.select_backend() is patch_gate.Backend.PATCH


@pytest.mark.parametrize("family", [4, 6])
def test_acks_on_the_wire_carry_only_committed_sequences_and_keep_the_right_edge(
        pair: VethPair, family: int) -> None:
    gate = PatchGate()
    data = os.urandom(256 * 1024)
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client = pair.connect(family, guard_listen=True)
        with server, client:
            info = gate.config(server)
            assert info.gated and info.commit_seq == info.rcv_nxt
            base = info.commit_seq
            commits = [base]
            consumed = 0
            with background(lambda: client.sendall(data)):
                while consumed < len(data):
                    consumed += len(server.recv(65536))
                    # well below the ~14 KB the peer has in flight at start (cwnd 10 at
                    # MTU 1500): held bytes beyond that would stall it (DESIGN.md section 4)
                    if seq_diff(seq_add(base, consumed), commits[-1]) >= 4096 \
                            or consumed == len(data):
                        seq = seq_add(base, consumed)
                        assert gate.commit(server, seq)
                        commits.append(seq)
            final = seq_add(base, len(data))
            origin = pair.origin_addr(family)
            cap.wait_for(lambda s: s.src == origin and s.ack == final)
            acks = [s for s in cap.segments(src=origin) if s.is_ack]
    syn_ack = next(s for s in acks if s.flags & TCP_SYN)
    assert syn_ack.wscale is not None
    data_acks = [s for s in acks if not s.flags & TCP_SYN]
    assert {s.ack for s in data_acks} <= set(commits)
    assert len({s.ack for s in data_acks}) > 3  # the commits really moved the ACK
    # The window field is widened by the held bytes rounded up to the scale, so the edge may
    # wobble by less than one scale unit, never by more.
    unit = 1 << syn_ack.wscale
    edges = [seq_add(s.ack, s.window << syn_ack.wscale) for s in data_acks]
    for earlier, later in itertools.pairwise(edges):
        assert seq_diff(later, earlier) > -unit, f"right edge moved back {earlier} -> {later}"


def _sack_after_out_of_order_segment(pair: VethPair, gated: bool) -> tuple[int, list[tuple[
        tuple[int, int], ...]]]:
    """Open a connection, deliver 1000 bytes, inject a segment 2000 bytes beyond them; return
    the commit and the SACK blocks of every origin segment after the injection."""
    run_in(pair.peer_ns, lambda: Path("/proc/sys/net/ipv4/tcp_timestamps").write_text("0"))
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client = pair.connect(4, guard_listen=gated)
        with server, client:
            client.sendall(b"a" * 1000)
            recv_exactly(server, 1000)
            info = patch_gate.commit_info(server)
            origin, peer = pair.origin_addr(4), pair.peer_addr(4)
            syn_ack = cap.wait_for(lambda s: s.src == origin and bool(s.flags & TCP_SYN))
            mark = cap.mark()
            hole = seq_add(info.rcv_nxt, 2000)
            inject(pair.peer_ns, (peer, client.getsockname()[1]), (origin, 5001), hole,
                   seq_add(syn_ack.seq, 1), b"z" * 500)
            cap.wait_for(lambda s: s.src == origin and s.ack == info.rcv_nxt
                         if not gated else s.src == origin, since=mark)
            wait_until(lambda: len(cap.segments(src=origin, since=mark)) >= 1, timeout=10)
            blocks = [s.sack for s in cap.segments(src=origin, since=mark)]
    return info.commit_seq, blocks


def test_an_ungated_origin_sacks_an_out_of_order_segment(pair: VethPair) -> None:
    _, blocks = _sack_after_out_of_order_segment(pair, gated=False)
    assert any(b for b in blocks), f"expected a SACK block without the gate, got {blocks}"


def test_a_gated_origin_sends_no_sack_block_above_the_commit(pair: VethPair) -> None:
    commit, blocks = _sack_after_out_of_order_segment(pair, gated=True)
    assert blocks, "expected the origin to answer the out-of-order segment"
    for seg_blocks in blocks:
        for start, end in seg_blocks:
            assert not after(end, commit), f"SACK block {start}-{end} above commit {commit}"


@pytest.fixture
def patient_pair() -> Iterator[VethPair]:
    """A pair whose peer waits 30 s before retransmitting: it has nothing to send but the
    retransmission of its held bytes, which a slow guest under load could otherwise fire
    before the commit (seen once in a stressed run)."""
    with VethPair(peer_rto_min_ms=30_000) as p:
        yield p


@pytest.mark.parametrize("family", [4, 6])
def test_a_commit_sends_its_ack_before_the_peer_sends_anything_else(
        patient_pair: VethPair, family: int) -> None:
    pair = patient_pair
    gate = PatchGate()
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client = pair.connect(family, guard_listen=True)
        with server, client:
            base = gate.config(server).commit_seq
            client.sendall(b"b" * 3000)
            recv_exactly(server, 3000)
            origin, peer = pair.origin_addr(family), pair.peer_addr(family)
            cap.wait_for(lambda s: s.src == peer and seq_add(s.seq, s.payload_len)
                         == seq_add(base, 3000))  # the capture has caught up
            assert all(not after(s.ack, base) for s in cap.segments(src=origin))
            mark = cap.mark()
            assert gate.commit(server, seq_add(base, 3000))
            ack = cap.wait_for(lambda s: s.src == origin and s.ack == seq_add(base, 3000),
                               since=mark)
            before_ack = cap.segments(since=mark)
            before_ack = before_ack[:before_ack.index(ack)]
    assert not [s for s in before_ack if s.src != origin], \
        "expected the commit's ACK to leave before any segment of the peer"


def test_a_fin_is_acknowledged_only_once_the_commit_passes_it(pair: VethPair) -> None:
    gate = PatchGate()
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client = pair.connect(4, guard_listen=True)
        with server, client:
            base = gate.config(server).commit_seq
            client.sendall(b"c" * 1000)
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(server, 1000) == b"c" * 1000
            assert server.recv(10) == b""
            assert gate.config(server).rcv_nxt == seq_add(base, 1001)
            origin = pair.origin_addr(4)
            assert gate.commit(server, seq_add(base, 1000))
            cap.wait_for(lambda s: s.src == origin and s.ack == seq_add(base, 1000))
            assert tcp_state(client) == TCP_INFO_STATE_FIN_WAIT1
            assert not [s for s in cap.segments(src=origin) if s.ack == seq_add(base, 1001)]
            assert gate.commit(server, seq_add(base, 1001))
            cap.wait_for(lambda s: s.src == origin and s.ack == seq_add(base, 1001))
            wait_until(lambda: tcp_state(client) == TCP_INFO_STATE_FIN_WAIT2,
                       what="the peer's FIN acknowledged", timeout=10)


def _active_close_holding_the_peers_fin(pair: VethPair, gate: PatchGate, cap: Capture,
                                        server: socket.socket, client: socket.socket) -> int:
    """Origin closes first (its FIN), the peer answers with its own FIN, which the origin's
    application reads but does not commit; returns the FIN's end (seq + 1) once the peer has
    retransmitted it at least once and every answer so far held it."""
    base = gate.config(server).commit_seq
    client.sendall(b"e" * 1000)
    assert recv_exactly(server, 1000) == b"e" * 1000
    assert gate.commit(server, seq_add(base, 1000))
    server.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b""
    client.shutdown(socket.SHUT_WR)
    assert server.recv(10) == b""  # the application has read the end of stream
    origin = pair.origin_addr(4)
    wait_until(lambda: len([s for s in cap.segments() if s.src != origin
                            and s.flags & TCP_FIN]) >= 2,
               what="the peer's FIN retransmitted (it was not acknowledged)", timeout=10)
    assert tcp_state(server) == TCP_INFO_STATE_FIN_WAIT2  # not a TIME_WAIT socket
    assert tcp_state(client) == TCP_INFO_STATE_LAST_ACK
    fin_end = seq_add(base, 1001)
    assert not [s for s in cap.segments(src=origin) if s.ack == fin_end]
    return fin_end


def test_after_an_active_close_the_peers_fin_waits_for_the_commit_before_time_wait(
        pair: VethPair) -> None:
    gate = PatchGate()
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client = pair.connect(4, guard_listen=True)
        with server, client:
            fin_end = _active_close_holding_the_peers_fin(pair, gate, cap, server, client)
            origin = pair.origin_addr(4)
            assert gate.commit(server, fin_end)
            cap.wait_for(lambda s: s.src == origin and s.ack == fin_end)
            wait_until(lambda: tcp_state(client) == TCP_INFO_STATE_CLOSE,
                       what="the peer's connection closed by the ACK of its FIN", timeout=10)
            assert tcp_state(server) == TCP_INFO_STATE_CLOSE  # handed to a TIME_WAIT socket


def test_closing_a_socket_that_holds_its_peers_fin_acknowledges_it(pair: VethPair) -> None:
    gate = PatchGate()
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client = pair.connect(4, guard_listen=True)
        with server, client:
            fin_end = _active_close_holding_the_peers_fin(pair, gate, cap, server, client)
            server.close()
            origin = pair.origin_addr(4)
            cap.wait_for(lambda s: s.src == origin and s.ack == fin_end)
            wait_until(lambda: tcp_state(client) == TCP_INFO_STATE_CLOSE,
                       what="the peer's connection closed by the ACK of its FIN", timeout=10)
            assert not [s for s in cap.segments(src=origin) if s.flags & 0x04]  # no RST


def _fast_open_once(pair: VethPair, gated: bool, port: int, data: bytes
                   ) -> tuple[socket.socket, socket.socket, int | None]:
    """A Fast Open client (no cookie needed) sends data in its SYN to a listener, gated or
    not; returns (accepted socket, client, the gate's commit at accept or None)."""
    origin = pair.origin_addr(4)

    def listen() -> socket.socket:
        Path("/proc/sys/net/ipv4/tcp_fastopen").write_text("515")  # 0x203: server, no cookie
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
        lst.bind((origin, port))
        lst.listen(4)
        return lst

    def send() -> socket.socket:
        Path("/proc/sys/net/ipv4/tcp_fastopen").write_text("5")  # client, no cookie
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.sendto(data, socket.MSG_FASTOPEN, (origin, port))
        return s

    listener = run_in(pair.origin_ns, listen)
    try:
        if gated:
            PatchGate().guard_listen(listener)
        client = run_in(pair.peer_ns, send)
        listener.settimeout(10)
        server, _ = listener.accept()
    finally:
        listener.close()
    return server, client, (PatchGate().config(server).commit_seq if gated else None)


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_a_gated_listener_takes_no_fast_open_data_in_the_syn(pair: VethPair, gated: bool
                                                              ) -> None:
    data = b"t" * 200
    port = 5301 + gated
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        server, client, base = _fast_open_once(pair, gated, port, data)
        with server, client:
            server.settimeout(10)
            assert recv_exactly(server, len(data)) == data
            syn = cap.wait_for(lambda s: s.dport == port and s.flags & TCP_SYN == TCP_SYN
                               and not s.is_ack)
            syn_ack = cap.wait_for(lambda s: s.sport == port and s.flags & TCP_SYN == TCP_SYN)
            if not gated:  # the control: Fast Open works here, the SYN-ACK acks the data
                assert syn.payload_len == len(data)
                assert syn_ack.ack == seq_add(syn.seq, 1 + len(data))
                return
            assert syn_ack.ack == seq_add(syn.seq, 1)  # the SYN's data was not taken
            assert base == seq_add(syn.seq, 1)
            origin = pair.origin_addr(4)
            assert not [s for s in cap.segments(src=origin) if after(s.ack, base)]
            assert PatchGate().commit(server, seq_add(base, len(data)))
            cap.wait_for(lambda s: s.src == origin and s.ack == seq_add(base, len(data)))


def test_the_commit_reads_back_and_is_refused_backwards_or_beyond_what_arrived(
        pair: VethPair) -> None:
    gate = PatchGate()
    server, client = pair.connect(4, guard_listen=True)
    with server, client:
        base = gate.config(server).commit_seq
        client.sendall(b"d" * 1000)
        recv_exactly(server, 1000)
        assert gate.commit(server, seq_add(base, 500))
        assert gate.config(server).commit_seq == seq_add(base, 500)
        assert not gate.commit(server, seq_add(base, 500))
        with pytest.raises(CommitRefused, match="backwards"):
            patch_gate.set_commit(server, seq_add(base, 499))
        with pytest.raises(CommitRefused, match="beyond"):
            patch_gate.set_commit(server, seq_add(base, 1001))
        info = gate.config(server)
        assert (info.commit_seq, info.rcv_nxt, info.copied_seq) == (
            seq_add(base, 500), seq_add(base, 1000), seq_add(base, 1000))


def test_guarding_an_established_socket_refuses_a_sequence_already_acknowledged(
        pair: VethPair) -> None:
    gate = PatchGate()
    server, client = pair.connect(4)
    with server, client:
        base = patch_gate.commit_info(server).rcv_nxt
        assert not patch_gate.commit_info(server).gated
        client.sendall(b"e" * 100)
        recv_exactly(server, 100)
        wait_until(lambda: client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > 0, timeout=10)
        with pytest.raises(CommitRefused):
            patch_gate.set_commit(server, base)  # the 100 bytes were acknowledged already
        info = gate.guard(server)
        assert info.gated and info.commit_seq == seq_add(base, 100)


@pytest.mark.parametrize("family", [4, 6])
def test_a_stream_committed_as_it_is_read_arrives_intact(pair: VethPair, family: int) -> None:
    gate = PatchGate()
    data = os.urandom(4 * 1024 * 1024)
    server, client = pair.connect(family, guard_listen=True)
    received = bytearray()
    with server, client:
        base = gate.config(server).commit_seq
        def send_all_then_fin() -> None:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)

        with background(send_all_then_fin):
            while chunk := server.recv(262144):
                received += chunk
                gate.commit(server, seq_add(base, len(received)))
        gate.commit(server, seq_add(base, len(received) + 1))  # the FIN
        wait_until(lambda: tcp_state(client) == TCP_INFO_STATE_FIN_WAIT2,
                   what="everything acknowledged to the peer", timeout=10)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_disconnecting_a_gated_socket_clears_its_gate(pair: VethPair) -> None:
    gate = PatchGate()
    server, client = pair.connect(4, guard_listen=True)
    with server, client:
        assert gate.config(server).gated
        _disconnect(server)
        info = gate.config(server)
        assert not info.gated and info.commit_seq == 0


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): the kernel's tcp_disconnect()."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    unspec = (ctypes.c_ubyte * 16)()  # struct sockaddr with sa_family = AF_UNSPEC (0)
    if libc.connect(sock.fileno(), unspec, 16) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
