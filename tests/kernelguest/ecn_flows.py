"""ECN flows in the guest for the TCPOPT_ECN_REPAIR tests (patched and stock kernels): a veth
pair with net.ipv4.tcp_ecn=1 on both ends, a connection that negotiated ECN dumped with
kernel/repair.py, its restore, and a CE-marked segment injected from the peer."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from kernel import repair
from kernel.ici import Ici, TcpOption
from kernel.sanity import Ecn, RestorePolicy
from kernel.seq import seq_add
from ops.capture import Capture, Segment
from ops.gatelab import recv_exactly
from ops.kernel.guestnet import TCP_ACK, TCP_PSH, VethPair, run_in, tcp_checksum
from ops.wait import wait_until

TCPI_OPT_ECN, TCPI_OPT_ECN_SEEN = 8, 16
TCP_ECN_QUEUE_CWR, TCP_ECN_DEMAND_CWR = 2, 4  # kernel-internal ecn_flags, never accepted
ECT_0, CE = 2, 3
PORT = 5001
SIOCOUTQ = 0x5411


@contextlib.contextmanager
def ecn_pair() -> Iterator[VethPair]:
    """A VethPair whose two namespaces request and accept ECN (net.ipv4.tcp_ecn=1)."""
    with VethPair() as p:
        for ns in (p.origin_ns, p.peer_ns):
            run_in(ns, lambda: Path("/proc/sys/net/ipv4/tcp_ecn").write_text("1"))
        yield p


def options(sock: socket.socket) -> int:
    return int(repair.tcp_info(sock).tcpi_options)


def outq(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0])


def ecn_flow_dumped(pair: VethPair, family: int, cap: Capture
                    ) -> tuple[Ici, socket.socket, socket.socket]:
    """(ICI, peer socket, origin socket) of a connection that negotiated ECN and sent 3000
    bytes ECT(0) from origin, everything acknowledged; the caller discards the origin."""
    server, client = pair.connect(family, port=PORT)
    assert options(server) & TCPI_OPT_ECN and options(client) & TCPI_OPT_ECN, \
        "the veth flow did not negotiate ECN"
    server.sendall(b"a" * 3000)
    assert recv_exactly(client, 3000, timeout=10) == b"a" * 3000
    wait_until(lambda: outq(server) == 0, 10, what="the origin's bytes acknowledged")
    before = {s.ecn for s in data_after(cap, pair.origin_addr(family), 0)}
    assert before == {ECT_0}, f"ECN field of the origin's data before the dump: {before}"
    ici = repair.dump(server)
    assert TcpOption.ECN in ici.params.options
    return ici, client, server


def restored(pair: VethPair, ici: Ici, family: int, policy_ecn: Ecn = Ecn.REFUSE,
             crash: socket.socket | None = None) -> socket.socket:
    """ici restored and activated in the origin's namespace under policy_ecn (the origin socket
    crash, if given, discarded silently first)."""
    policy = dataclasses.replace(RestorePolicy.serving(pair.origin_addr(family)), ecn=policy_ecn)

    def restore() -> socket.socket:
        if crash is not None:
            repair.discard(crash)
        return repair.activate(repair.restore(ici, policy))

    return run_in(pair.origin_ns, restore)


def data_after(cap: Capture, src: str, mark: int) -> list[Segment]:
    """The data segments from src captured since mark, once the capture is flushed (everything
    that crossed the interface before the call is in it)."""
    assert cap.flush(), f"the capture on {cap.where} did not flush"
    return [s for s in cap.segments(src=src, since=mark) if s.payload_len]


def send_after_restore(sock: socket.socket, client: socket.socket, n: int) -> None:
    """n bytes from the restored socket to the peer, received and acknowledged."""
    data = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
    sock.sendall(data)
    assert recv_exactly(client, n, timeout=10) == data
    wait_until(lambda: outq(sock) == 0, 10, what="the restored socket's bytes acknowledged")


def inject_ce_data(pair: VethPair, ici: Ici, client: socket.socket, payload: bytes,
                   ack: int) -> int:
    """A data segment from the peer's address and port to the restored socket, IP ECN field CE,
    with the bytes the peer sends next (the peer's own copy follows as a duplicate). Returns
    the sequence it ends at."""
    seq = ici.rcv_nxt
    src, dst = pair.peer_addr(4), pair.origin_addr(4)
    sport = client.getsockname()[1]
    head = struct.pack("!HHIIBBHHH", sport, PORT, seq, ack, 5 << 4, TCP_ACK | TCP_PSH,
                       0xFFFF, 0, 0)
    check = tcp_checksum(src, dst, head + payload)
    segment = head[:16] + struct.pack("!H", check) + head[18:] + payload

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
            raw.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, CE)  # raw sockets keep ECN bits
            raw.sendto(segment, (dst, 0))

    run_in(pair.peer_ns, send)
    return seq_add(seq, len(payload))


def ack_of_ce_data(pair: VethPair, ici: Ici, client: socket.socket, sock: socket.socket,
                   cap: Capture, sent: int) -> Segment:
    """Inject CE-marked data, let the peer send the same bytes for real, and return the restored
    socket's first segment acknowledging them (the application reads them once). sent: the
    bytes the restored socket has sent (and had acknowledged) since the dump."""
    payload = b"ce-marked"
    mark = cap.mark()
    end = inject_ce_data(pair, ici, client, payload, ack=seq_add(ici.snd_una, sent))
    ack = cap.wait_for(lambda s: s.src == pair.origin_addr(4) and s.ack == end, since=mark,
                       what="the restored socket's ACK of the CE-marked bytes")
    client.sendall(payload)  # the peer's own copy: a duplicate for the restored socket
    assert recv_exactly(sock, len(payload), timeout=10) == payload
    return ack


def repaired_socket(pair: VethPair) -> socket.socket:
    """A socket connected in repair mode (no SYN) in the origin namespace, nothing sent."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, repair.REPAIR_ON)
        sock.connect((pair.peer_addr(4), 9))
        return sock

    return run_in(pair.origin_ns, make)


def set_ecn(sock: socket.socket, value: int) -> None:
    """TCP_REPAIR_OPTIONS with the one option TCPOPT_ECN_REPAIR = value."""
    sock.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR_OPTIONS,
                    struct.pack("II", repair.TCPOPT_ECN_REPAIR, value))
