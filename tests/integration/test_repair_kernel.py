"""Dump and restore on the real kernel, in the lab: an endpoint dumped on origin lives on in
standby's namespace, every byte arriving exactly once; refused ICIs leave nothing behind."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from kernel import codec, repair, sanity
from kernel.ici import Ici
from kernel.isolation import Isolation, flow_of
from kernel.sanity import IciRejected, RestorePolicy
from ops import gatelab
from ops.capture import Capture
from ops.lab import Lab
from ops.wait import wait_until

pytestmark = pytest.mark.lab
PORT = 8400


def counting(offset: int, n: int) -> bytes:
    """The counting stream: byte i of the stream is i mod 251."""
    start = offset % 251
    reps = (start + n) // 251 + 1
    return (bytes(range(251)) * reps)[start : start + n]


recv_exactly = functools.partial(gatelab.recv_exactly, timeout=10.0)


@pytest.fixture()
def on_origin(lab: Lab) -> Iterator[Lab]:
    """Each test starts with the service on origin."""
    lab.switch_route("origin")
    yield lab
    lab.switch_route("origin")


def connect(lab: Lab, family: int, port: int) -> tuple[socket.socket, socket.socket]:
    """A connection peer -> service (answered by origin): (peer socket, origin socket)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with lab.enter("origin"):
        ls = socket.socket(af, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((lab.service(family), port))
        ls.listen()
    with lab.enter("peer"):
        peer = socket.create_connection((lab.service(family), port), timeout=5)
    origin, _ = ls.accept()
    ls.close()
    return peer, origin


def queue_bytes(sock: socket.socket, ioctl: int) -> int:
    """SIOCINQ/SIOCOUTQ/SIOCOUTQNSD of sock."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), ioctl, buf)
    return int(struct.unpack("i", buf)[0])


def ss_lines(lab: Lab, host: str, port: int) -> list[str]:
    out = lab.run(host, ["ss", "-Htan", f"sport = :{port} or dport = :{port}"],
                  capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def total_retrans(sock: socket.socket) -> int:
    """tcp_info's tcpi_total_retrans: segments this socket has retransmitted."""
    return int(repair.tcp_info(sock).tcpi_total_retrans)


@pytest.mark.parametrize("family", [4, 6])
def test_endpoint_dumped_on_origin_continues_on_standby_with_every_byte_once(
    on_origin: Lab, family: int
) -> None:
    lab = on_origin
    port = PORT + family
    peer, origin = connect(lab, family, port)
    up, down = 0, 0  # bytes peer->server and server->peer so far
    peer.sendall(counting(up, 30_000))  # stays unread in origin's receive queue
    up += 30_000
    origin.sendall(counting(down, 20_000))
    assert recv_exactly(peer, 20_000) == counting(0, 20_000)
    down += 20_000
    wait_until(lambda: repair.tcp_info(origin).tcpi_unacked == 0, 5, what="all acked")
    mss = origin.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    flow = flow_of(origin)
    with lab.enter("origin"):
        isolation = Isolation(table=f"iso{family}")
        isolation.add([flow])
    try:
        origin.sendall(counting(down, 5_000))  # cannot leave: never sent, or sent and lost
        down += 5_000
        ici = repair.dump(origin, stay_in_repair=True)
        repair.discard(origin)
        assert ici.received == counting(0, 30_000)
        assert ici.sent + ici.unsent == counting(20_000, 5_000)
        assert ici.unsent, "the isolation returned errors to TCP: nothing of it left as sent"
        policy = RestorePolicy.serving(lab.service(family))
        with lab.enter("standby"):
            restored = repair.restore(ici, policy)
        lab.switch_route("standby")
        sock = repair.activate(restored)
        assert recv_exactly(peer, 5_000) == counting(20_000, 5_000)
        assert total_retrans(sock) == 0, "unsent bytes went out as retransmissions"
        assert recv_exactly(sock, 30_000) == counting(0, 30_000)
        peer.sendall(counting(up, 100_000))
        sock.sendall(counting(down, 100_000))
        assert recv_exactly(sock, 100_000) == counting(up, 100_000)
        assert recv_exactly(peer, 100_000) == counting(down, 100_000)
        peer.settimeout(0.3)
        with pytest.raises(TimeoutError):
            peer.recv(1)  # nothing more: no byte twice
        assert sock.getsockname()[1] == port
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == mss > 1000
        sock.close()
        peer.close()
    finally:
        with lab.enter("origin"):
            isolation.close()


def test_bytes_restored_as_sent_are_resent_in_full_sized_segments(on_origin: Lab) -> None:
    """TCP_MAXSEG is set before connect: otherwise the restored send queue is cut by an MSS
    derived from 536 and every retransmission of it goes out in small segments."""
    lab = on_origin
    port = PORT + 70
    peer, origin = connect(lab, 4, port)
    mss = origin.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    lab.partition("origin", ["peer"])  # at the gateway: origin's kernel believes it sent
    try:
        origin.sendall(counting(0, 8 * mss))  # within the initial window: all of it "sent"
        wait_until(lambda: queue_bytes(origin, repair.SIOCOUTQNSD) == 0, 5, what="all sent")
        ici = repair.dump(origin, stay_in_repair=True)
        repair.discard(origin)
    finally:
        lab.heal()
    assert len(ici.sent) == 8 * mss and ici.unsent == b""
    with Capture.in_lab(lab, "peer", "eth0", f"tcp src port {port}") as cap:
        with lab.enter("standby"):
            restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)))
        lab.switch_route("standby")
        sock = repair.activate(restored)
        assert recv_exactly(peer, 8 * mss) == counting(0, 8 * mss)  # on the retransmit timer
    # the peer's GRO may merge full segments
    sizes = [s.payload_len for s in cap.segments() if s.payload_len]
    assert sum(sizes) >= 8 * mss
    assert all(n % mss == 0 for n in sizes), f"resent as {sizes} with an mss of {mss}"
    sock.close()
    peer.close()


def test_restored_timestamp_clock_continues_from_the_checkpoint(on_origin: Lab) -> None:
    lab = on_origin
    peer, origin = connect(lab, 4, PORT + 10)
    ici = repair.dump(origin, stay_in_repair=True)
    repair.discard(origin)
    with lab.enter("standby"):  # restored as if 200 ms after the dump
        restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)), ts_margin_ms=50,
                                  now_ms=ici.timestamp.read_at_ms + 200)
    now = restored.sock.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP) & 0xFFFFFFFF
    elapsed = (now - ici.timestamp.tsval) % 2**32
    assert 250 <= elapsed < 1_000, f"clock moved {elapsed} ms over a 200 ms pause + 50 ms margin"
    repair.discard_restored(restored)
    peer.close()


@pytest.mark.parametrize("usec", [False, True])
def test_restored_timestamp_clock_keeps_the_unit_it_was_dumped_with(on_origin: Lab,
                                                                    usec: bool) -> None:
    """TCP_TIMESTAMP's low bit is the clock's mode: an estimate of the wrong parity would turn
    a millisecond clock into a microsecond one (the peer then sees TSval run 1,000 times too
    fast and drops reordered ACKs as PAWS failures)."""
    lab = on_origin
    peer, origin = connect(lab, 4, PORT + 60 + usec)
    ici = repair.dump(origin, stay_in_repair=True)
    repair.discard(origin)
    assert not ici.timestamp.usec, "the lab's connections count milliseconds"
    if usec:  # as a connection over a route with the tcp_usec_ts feature would be dumped
        ici = dataclasses.replace(ici, timestamp=dataclasses.replace(
            ici.timestamp, tsval=ici.timestamp.tsval | 1))
    with lab.enter("standby"):  # no time elapsed + an odd margin: an odd sum before rounding
        restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)),
                                  now_ms=ici.timestamp.read_at_ms, ts_margin_ms=101)
    try:
        first = restored.sock.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP) & 0xFFFFFFFF
        time.sleep(0.2)
        second = restored.sock.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP) & 0xFFFFFFFF
    finally:
        repair.discard_restored(restored)
        peer.close()
    assert first & 1 == usec
    unit = 1000 if usec else 1
    ticks = (second - first) % 2**32
    assert 150 * unit <= ticks <= 2_000 * unit, f"{ticks} ticks in 200 ms"


@pytest.mark.parametrize("mode", [repair.PortMode.ANY, repair.PortMode.PREBOUND])
def test_restore_takes_its_local_port_from_the_chosen_mode(on_origin: Lab,
                                                           mode: repair.PortMode) -> None:
    lab = on_origin
    peer, origin = connect(lab, 4, PORT + 20 + (mode is repair.PortMode.PREBOUND))
    ici = repair.dump(origin)
    with lab.enter("standby"):
        pre = None
        if mode is repair.PortMode.PREBOUND:
            pre = socket.socket()
            pre.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            pre.setsockopt(socket.IPPROTO_IP, repair.IP_FREEBIND, 1)
            pre.bind((lab.service(4), 40123))
        restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)), port_mode=mode,
                                  sock=pre)
    port = restored.sock.getsockname()[1]
    assert port != ici.identity.local_port
    if mode is repair.PortMode.PREBOUND:
        assert port == 40123
    assert restored.sock.getpeername() == peer.getsockname()
    repair.discard_restored(restored)
    origin.close()
    peer.close()


def _forgeries(ici: Ici, foreign: str) -> dict[str, Ici]:
    """Broken ICIs keyed by the reason the refusal must give (a regular expression)."""
    p, w, i = ici.params, ici.window, ici.identity
    wup = (ici.rcv_nxt + 10) % 2**32
    return {
        "window scale: snd_wscale: expected at most 14, got 15": dataclasses.replace(
            ici, params=dataclasses.replace(p, snd_wscale=15)),
        rf"window: max_window: expected at least snd_wnd \({w.snd_wnd}\), got {w.snd_wnd - 1}":
            dataclasses.replace(ici, window=dataclasses.replace(w, max_window=w.snd_wnd - 1)),
        rf"window: rcv_wup: expected at or before rcv_nxt \({ici.rcv_nxt}\), got {wup}":
            dataclasses.replace(ici, window=dataclasses.replace(w, rcv_wup=wup)),
        rf"local address: {foreign} is not an address this host serves \(expected one of: ":
            dataclasses.replace(ici, identity=dataclasses.replace(
                i, local_addr=ipaddress.ip_address(foreign).packed)),
    }


def _corrupted(raw: bytes) -> dict[str, bytes]:
    """Broken encodings keyed by the reason the refusal must give (a regular expression)."""
    wrong_version = bytearray(raw[:-4])
    wrong_version[4:6] = struct.pack("!H", codec.VERSION + 1)
    resealed = bytes(wrong_version) + struct.pack("!I", zlib.crc32(wrong_version))
    return {
        rf"ICI field version: expected {codec.VERSION}, got {codec.VERSION + 1}": resealed,
        rf"ICI field total length: expected {len(raw) - 9} \(the bytes given\), got {len(raw)}":
            raw[:-9],
    }


_sockets_made: list[int] = []
_counting_sockets: set[int] = set()


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.__new__" and threading.get_ident() in _counting_sockets:
        _sockets_made.append(1)


sys.addaudithook(_audit)


@contextlib.contextmanager
def sockets_created() -> Iterator[list[int]]:
    """Counts the sockets this thread creates inside the block (Python's audit events)."""
    _sockets_made.clear()
    _counting_sockets.add(threading.get_ident())
    try:
        yield _sockets_made
    finally:
        _counting_sockets.discard(threading.get_ident())


@pytest.mark.parametrize("family", [4, 6])
def test_forged_icis_are_refused_before_any_socket_and_leave_no_packet(
    on_origin: Lab, family: int,
) -> None:
    lab = on_origin
    port = PORT + 30 + family
    peer, origin = connect(lab, family, port)
    ici = repair.dump(origin)
    policy = RestorePolicy.serving(lab.service(family))
    with Capture.in_lab(lab, "standby", "eth0", f"tcp port {port}") as cap:
        fds_before = len(os.listdir("/proc/self/fd"))
        with lab.enter("standby"):
            with sockets_created() as made:
                for reason, raw in _corrupted(codec.encode(ici)).items():
                    with pytest.raises(codec.IciDecodeError, match=reason):
                        repair.restore(codec.decode(raw), policy)
                for reason, forged in _forgeries(ici, lab.addr("standby", family)).items():
                    with pytest.raises(IciRejected, match=reason):
                        repair.restore(codec.decode(codec.encode(forged)), policy)
            assert made == [], "a socket was created for an ICI the checks refuse"
            with sockets_created() as made:  # control: the count sees restore's socket
                repair.discard_restored(repair.restore(ici, policy))
            assert made == [1]
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            listening = socket.socket(af)  # kernel-refused: repair mode on a listening socket
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind(("0.0.0.0" if family == 4 else "::", 0))
            listening.listen()
            with pytest.raises(repair.RepairError, match=r"TCP_REPAIR=1 on .*EPERM"):
                repair.restore(ici, policy, port_mode=repair.PortMode.PREBOUND, sock=listening)
            assert listening.fileno() == -1, "the refused socket was left open"
            # control: the capture does see this port (SYN out, RST back from the peer)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((lab.addr("peer", family), port), timeout=5)
        assert len(os.listdir("/proc/self/fd")) == fds_before
        assert ss_lines(lab, "standby", port) == []
    assert len(cap.segments()) == 2, "standby sent or received more than the control's 2 packets"
    origin.close()
    peer.close()


def test_kept_socket_options_and_large_queues_survive_the_restore(on_origin: Lab) -> None:
    lab = on_origin
    peer, origin = connect(lab, 4, PORT + 40)
    origin.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    origin.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    origin.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 33)
    origin.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    peer.sendall(counting(0, 100_000))  # unread: receive queue
    wait_until(lambda: queue_bytes(origin, repair.SIOCINQ) == 100_000, 5, what="queued")
    with lab.enter("origin"):
        isolation = Isolation(table="iso_big")
        isolation.add([flow_of(origin)])
    try:
        origin.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        origin.setblocking(False)
        queued = 0
        with contextlib.suppress(BlockingIOError):
            while queued < 1_000_000:
                queued += origin.send(counting(queued, 1_000_000 - queued))
        ici = repair.dump(origin, stay_in_repair=True)
        repair.discard(origin)
        assert len(ici.sent) + len(ici.unsent) == queued > 500_000
        assert len(ici.received) == 100_000
        with lab.enter("standby"):
            restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)))
        lab.switch_route("standby")
        sock = repair.activate(restored)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 33
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert recv_exactly(peer, queued, timeout=20) == counting(0, queued)
        assert recv_exactly(sock, 100_000) == counting(0, 100_000)
        sock.close()
        peer.close()
    finally:
        with lab.enter("origin"):
            isolation.close()


def paws_estab(lab: Lab) -> int:
    out = lab.run("peer", ["nstat", "-azs", "--json"], capture_output=True, text=True,
                  check=True).stdout
    return int(json.loads(out)["kernel"]["TcpExtPAWSEstab"])


def test_a_timestamp_clock_restored_behind_the_origin_is_dropped_by_the_peers_paws(
    on_origin: Lab,
) -> None:
    """Control for the passing tests' PAWS check: the counter does move when TSval goes back."""
    lab = on_origin
    peer, origin = connect(lab, 4, PORT + 50)
    origin.sendall(b"a" * 100)
    assert recv_exactly(peer, 100) == b"a" * 100
    before = paws_estab(lab)
    ici = repair.dump(origin, stay_in_repair=True)
    repair.discard(origin)
    with lab.enter("standby"):
        restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)),
                                  ts_margin_ms=-60_000)
    lab.switch_route("standby")
    sock = repair.activate(restored)
    sock.sendall(b"b" * 100)
    wait_until(lambda: paws_estab(lab) > before, 5, what="PAWS drop counted")
    repair.discard(sock)
    peer.close()


@pytest.mark.parametrize("locked", [False, True])
def test_ten_passes_keep_the_buffer_locks_and_do_not_ratchet_the_sizes(on_origin: Lab,
                                                                      locked: bool) -> None:
    """Each pass restores the dumped sizes and SO_BUF_LOCK bits: autotuned buffers stay
    autotuned (bits 0), application-fixed ones keep their size and bits."""
    lab = on_origin
    peer, sock = connect(lab, 4, PORT + 80 + locked)
    if locked:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 200_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 100_000)
    first = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
             sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    policy = RestorePolicy.serving(lab.service(4))
    down = 0
    for _ in range(10):
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # bulk download: fill the send queue as far as the buffer lets us
                down += sock.send(counting(down, 1 << 20))
        sock.setblocking(True)
        ici = repair.dump(sock, stay_in_repair=True)
        repair.discard(sock)
        with lab.enter("origin"):
            sock = repair.activate(repair.restore(ici, policy))
        assert sock.getsockopt(socket.SOL_SOCKET, repair.SO_BUF_LOCK) == (3 if locked else 0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == ici.sockopts.sndbuf
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == ici.sockopts.rcvbuf
    if locked:
        assert (ici.sockopts.sndbuf, ici.sockopts.rcvbuf) == first
    wmem_max = int(lab.sysctl_get("origin", "net.ipv4.tcp_wmem").split()[2])
    assert ici.sockopts.sndbuf <= wmem_max, "the send buffer ratcheted past autotuning's cap"
    got = recv_exactly(peer, down, timeout=30)
    assert got == counting(0, down)
    sock.close()
    peer.close()


def test_restored_autotuned_buffers_keep_growing_with_bulk_traffic(on_origin: Lab) -> None:
    """Restore leaves SO_BUF_LOCK at the dumped 0: the send buffer goes on tracking autotuning
    (it grows under bulk traffic) instead of staying pinned at the restored size."""
    lab = on_origin
    peer, sock = connect(lab, 4, PORT + 85)
    ici = repair.dump(sock, stay_in_repair=True)
    repair.discard(sock)
    with lab.enter("origin"):
        sock = repair.activate(repair.restore(ici, RestorePolicy.serving(lab.service(4))))
    restored_size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert restored_size == ici.sockopts.sndbuf
    total = 32 << 20
    reader = threading.Thread(target=recv_exactly, args=(peer, total), kwargs={"timeout": 30})
    reader.start()
    sock.sendall(counting(0, total))
    reader.join()
    assert sock.getsockopt(socket.SOL_SOCKET, repair.SO_BUF_LOCK) == 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > restored_size
    sock.close()
    peer.close()


def test_an_ecn_flow_is_refused_by_default_and_continues_without_ecn_when_downgraded(
    on_origin: Lab,
) -> None:
    """No stock kernel restores TCP_ECN_OK (kernel/sanity.py): the default policy refuses the
    flow before any socket exists; DOWNGRADE restores it and its segments leave Not-ECT
    (control: the same flow's segments from origin carried ECT(0))."""
    lab = on_origin
    port = PORT + 87
    for host in ("peer", "origin", "standby"):
        lab.sysctl(host, "net.ipv4.tcp_ecn", 1)
    try:
        peer, origin = connect(lab, 4, port)
        assert repair.tcp_info(origin).tcpi_options & 8, "the lab flow negotiated ECN"
        with Capture.in_lab(lab, "peer", "eth0", f"tcp src port {port}") as cap:
            origin.sendall(counting(0, 50_000))
            assert recv_exactly(peer, 50_000) == counting(0, 50_000)
        before = [seg.ecn for seg in cap.segments()]
        ici = repair.dump(origin, stay_in_repair=True)
        repair.discard(origin)
        policy = RestorePolicy.serving(lab.service(4))
        with lab.enter("standby"):  # the kernel's ECN answer, probed (with its own throwaway
            assert not repair.kernel_restores_ecn()  # socket) before counting restore's
        with lab.enter("standby"), sockets_created() as made, pytest.raises(
                IciRejected, match="ecn: expected a flow without ECN"):
            repair.restore(ici, policy)
        assert made == []
        with Capture.in_lab(lab, "peer", "eth0", f"tcp src port {port}") as cap:
            with lab.enter("standby"):
                restored = repair.restore(ici, dataclasses.replace(policy,
                                                                   ecn=sanity.Ecn.DOWNGRADE))
            lab.switch_route("standby")
            sock = repair.activate(restored)
            assert not repair.tcp_info(sock).tcpi_options & 8
            sock.sendall(counting(50_000, 50_000))
            assert recv_exactly(peer, 50_000) == counting(50_000, 50_000)
        after = [seg.ecn for seg in cap.segments()]
        assert 2 in before, f"ECN field of the flow on origin: {before}"
        assert after and set(after) == {0}, f"ECN field of the restored flow: {after}"
        sock.close()
        peer.close()
    finally:
        for host in ("peer", "origin", "standby"):
            lab.sysctl(host, "net.ipv4.tcp_ecn", 2)
