"""TCP_ACCEPT_AHEAD (the paper's section 6.1) and a crash with held bytes, on the patched guest.

A checkpoint is taken with kernel/repair.py, the origin sends more (which the peer receives and
acknowledges), the origin socket is discarded silently (the crash), and the checkpoint is
restored in the origin's namespace: the peer's ACK is now beyond the restored snd_nxt.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import pytest

from kernel import patch_gate, repair
from kernel.patch_gate import PatchGate
from kernel.sanity import RestorePolicy
from kernel.seq import seq_add
from ops.capture import Capture
from ops.gatelab import recv_exactly
from ops.kernel.guestnet import VethPair, run_in
from ops.wait import wait_until

SIOCOUTQ = 0x5411


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with VethPair() as p:
        yield p


def _outq(sock: socket.socket) -> int:
    import fcntl
    import struct
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0])


def _checkpoint_then_send_more(pair: VethPair, family: int, more: int
                               ) -> tuple[repair.Ici, socket.socket, socket.socket]:
    server, client = pair.connect(family)
    server.sendall(b"f" * 1000)
    assert recv_exactly(client, 1000) == b"f" * 1000
    wait_until(lambda: _outq(server) == 0, what="the first 1000 bytes acknowledged", timeout=10)
    ici = repair.dump(server)
    server.sendall(b"g" * more)
    assert recv_exactly(client, more) == b"g" * more
    wait_until(lambda: _outq(server) == 0, what="the later bytes acknowledged", timeout=10)
    return ici, client, server  # the caller crashes server (closed in repair mode, silently)


def _restore(pair: VethPair, ici: repair.Ici, family: int, arm: bool,
             commit: int | None = None, crash: socket.socket | None = None,
             window_probe: bool = True) -> socket.socket:
    def restore() -> socket.socket:
        if crash is not None:  # discarded right before the restore: no segment finds the gap
            repair.discard(crash)
        restored = repair.restore(ici, RestorePolicy.serving(pair.origin_addr(family)))
        if arm:
            patch_gate.arm_accept_ahead(restored.sock)
        if commit is not None:  # gated before its first segment
            patch_gate.set_commit(restored.sock, commit)
        # the window probe on leaving repair mode makes the peer answer with its ACK
        return repair.activate(restored, window_probe=window_probe)

    return run_in(pair.origin_ns, restore)


@pytest.mark.parametrize("family", [4, 6])
def test_a_restored_socket_accepts_the_peers_ack_beyond_snd_nxt_and_reports_the_distance(
        pair: VethPair, family: int) -> None:
    ici, client, server = _checkpoint_then_send_more(pair, family, more=5000)
    with client:
        sock = _restore(pair, ici, family, arm=True, crash=server)
        with sock:
            wait_until(lambda: patch_gate.accept_ahead(sock).distance == 5000,
                       what="the ACK beyond snd_nxt accepted", timeout=10)
            assert not patch_gate.accept_ahead(sock).armed
            client.sendall(b"hello")
            sock.settimeout(10)
            assert recv_exactly(sock, 5) == b"hello"
            sock.sendall(b"next")
            client.settimeout(10)
            assert recv_exactly(client, 4) == b"next"


def test_without_any_probe_the_peers_next_data_segment_is_accepted_with_its_ack(
        pair: VethPair) -> None:
    ici, client, server = _checkpoint_then_send_more(pair, 4, more=3000)
    with client:
        sock = _restore(pair, ici, 4, arm=True, crash=server, window_probe=False)
        with sock:
            assert patch_gate.accept_ahead(sock) == patch_gate.AheadInfo(0, True)
            client.sendall(b"hello")  # its ACK field is 3000 beyond the restored snd_nxt
            sock.settimeout(10)
            assert recv_exactly(sock, 5) == b"hello"
            assert patch_gate.accept_ahead(sock) == patch_gate.AheadInfo(3000, False)


def test_without_the_option_the_peers_segments_are_dropped_as_acking_unsent_data(
        pair: VethPair) -> None:
    ici, client, server = _checkpoint_then_send_more(pair, 4, more=5000)
    with client:
        sock = _restore(pair, ici, 4, arm=False, crash=server)
        with sock:
            client.sendall(b"hello")
            sock.settimeout(2)
            with pytest.raises(TimeoutError):
                sock.recv(5)
            assert patch_gate.accept_ahead(sock) == patch_gate.AheadInfo(0, False)


def test_held_bytes_stay_with_the_peer_through_a_crash_and_arrive_once_after_restore(
        pair: VethPair) -> None:
    gate = PatchGate()
    server, client = pair.connect(4, guard_listen=True)
    data = bytes(range(256)) * 40  # 10240 bytes
    with client, Capture(pair.peer_ns, "eth0", "tcp") as cap:
        base = gate.config(server).commit_seq
        client.sendall(data)
        got = recv_exactly(server, len(data))
        assert got == data
        assert gate.commit(server, seq_add(base, 4000))  # the application checkpointed 4000
        wait_until(lambda: _outq(client) == len(data) - 4000,
                   what="the peer holding exactly the uncommitted bytes", timeout=10)
        ici = repair.dump(server)
        # the checkpoint holds the committed receive sequence, not what the kernel received
        ici = dataclasses.replace(
            ici, rcv_nxt=seq_add(base, 4000), received=b"",
            window=dataclasses.replace(ici.window, rcv_wup=seq_add(base, 4000)))
        # A retransmission reaching the origin while no socket exists would be answered with
        # RST (the resurrector quarantines the flow first). Crash just after the peer's first
        # retransmission, so its next one comes a doubled RTO later, and restore at once.
        mark = cap.mark()
        cap.wait_for(lambda s: s.seq == seq_add(base, 4000) and s.payload_len > 0, since=mark)
        sock = _restore(pair, ici, 4, arm=False, commit=seq_add(base, 4000), crash=server)
        with sock:
            assert gate.config(sock).gated
            sock.settimeout(30)
            rest = bytearray()
            try:
                while len(rest) < len(data) - 4000:  # committed as read: the peer needs ACKs
                    rest += sock.recv(65536)
                    gate.commit(sock, seq_add(base, 4000 + len(rest)))
            except TimeoutError:
                pytest.fail(f"the held bytes never arrived; wire: {cap.segments()[-30:]}")
            assert rest == data[4000:]
            wait_until(lambda: _outq(client) == 0, what="the peer's queue emptied", timeout=10)
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # nothing arrives twice
