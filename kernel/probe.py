"""The standby's probe of a peer (DESIGN.md section 6, step 3): one segment, sent from the
service address before any socket exists for the flow, that the peer must answer with an ACK
telling where it stands. The answer is caught by the ingress quarantine (kernel/quarantine.py).

    packet = probe_packet(ici, tsval)          # pure
    send_probe(ici, tsval)                     # raw socket, in the calling thread's netns

The segment carries 1 byte of data far before anything the peer could still accept (its
sequence PROBE_BEHIND below the checkpoint's snd_una): the peer finds it outside its window and
answers with a duplicate ACK. Zero-length out-of-window segments are rate-limited by the peer
(tcp_oow_rate_limited, sysctl tcp_invalid_ratelimit); segments with data are not. The byte is
never accepted: with PROBE_BEHIND = 2**30 it lies a quarter of the sequence space before
snd_una, which no receive window reaches.

It acknowledges the checkpoint's rcv_nxt, the committed sequence: the peer's snd_una is at most
that (the ACK gate never let it see more) and its snd_nxt at least, so the peer takes the ack
as acceptable and changes nothing. With timestamps it carries TSval `tsval`, which the caller
takes from the clock estimate (plus margin), so the peer's PAWS check passes (a segment failing
PAWS would be answered too, but counted as a PAWS drop on the peer).
"""

from __future__ import annotations

import socket
import struct

from kernel.ici import Family, Ici, TcpOption
from kernel.segment import ACK, checksum, tcp_packet
from kernel.seq import seq_add

PROBE_BEHIND = 1 << 30
_AF = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}


def probe_seq(ici: Ici) -> int:
    """The probe's sequence number: far before the checkpoint's send side."""
    return seq_add(ici.snd_una, -PROBE_BEHIND)


def probe_packet(ici: Ici, tsval: int) -> bytes:
    """The probe (IP header included) for the connection of checkpoint `ici`."""
    ident = ici.identity
    options = b""
    if TcpOption.TIMESTAMPS in ici.params.options:
        options = struct.pack("!BBBBII", 1, 1, 8, 10, tsval & 0xFFFFFFFF, 0)
    window = min(0xFFFF, ici.window.rcv_wnd >> ici.params.rcv_wscale)
    return tcp_packet(ident.local_addr, ident.peer_addr, ident.local_port, ident.peer_port,
                      probe_seq(ici), ici.rcv_nxt, ACK, window, options, b"\0")


def send_probe(ici: Ici, tsval: int, raw: socket.socket | None = None) -> None:
    """Send the probe through a raw socket of the calling thread's network namespace (where
    the service address now routes to: take the traffic over first). raw: an open
    raw_socket(family) to send through (one for thousands of probes), else one is opened."""
    af = _AF[ici.identity.family]
    dst = socket.inet_ntop(af, ici.identity.peer_addr)
    if raw is not None:
        raw.sendto(probe_packet(ici, tsval), (dst, 0))
        return
    with raw_socket(ici.identity.family) as own:
        own.sendto(probe_packet(ici, tsval), (dst, 0))


def raw_socket(family: Family) -> socket.socket:
    """A raw IP socket (IPPROTO_RAW: we write the IP header) of the calling thread's namespace."""
    return socket.socket(_AF[family], socket.SOCK_RAW, socket.IPPROTO_RAW)


def unreachable_message(ici: Ici) -> bytes:
    """The ICMP (IPv4: host unreachable) or ICMPv6 (no route) message, without its own IP
    header, quoting a segment of the peer's that starts at our rcv_nxt, the peer's snd_una (the
    ACK gate never let it see more): what RFC 6069 lets the peer's stack take as a sign that its
    retransmissions were lost on the way, not to congestion."""
    ident = ici.identity
    tcp8 = struct.pack("!HHI", ident.peer_port, ident.local_port, ici.rcv_nxt)
    if ident.family is Family.IPV4:
        inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                            ident.peer_addr, ident.local_addr)
        body = struct.pack("!BBHI", 3, 1, 0, 0) + inner + tcp8
        return body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    inner = struct.pack("!IHBB16s16s", 6 << 28, 20, socket.IPPROTO_TCP, 64, ident.peer_addr,
                        ident.local_addr)
    return struct.pack("!BBHI", 1, 0, 0, 0) + inner + tcp8  # the kernel sums ICMPv6


def wake_peer(ici: Ici, count: int = 12) -> None:
    """Make a peer that holds bytes for a restored connection resend them now, not at its
    backed-off retransmission timer: each unreachable message undoes one doubling of its timer
    (tcp_ld_RTO_revert), and once the time already waited exceeds the reverted timeout it
    retransmits at once. count covers 12 doublings (200 ms backed off to 120 s)."""
    ident = ici.identity
    af = _AF[ident.family]
    proto = socket.IPPROTO_ICMP if af == socket.AF_INET else socket.IPPROTO_ICMPV6
    message = unreachable_message(ici)
    with socket.socket(af, socket.SOCK_RAW, proto) as raw:
        raw.bind((socket.inet_ntop(af, ident.local_addr), 0))
        for _ in range(count):
            raw.sendto(message, (socket.inet_ntop(af, ident.peer_addr), 0))
