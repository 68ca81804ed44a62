"""Raw TCP segments with their IP header, for IPPROTO_RAW sockets: one pure builder.

Used by the forced ACKs of the ACK gate (kernel/forced_ack.py) and by the segments a restore
injects to replay a peer's FIN or ACK (kernel/repair.py). The TCP checksum is computed over the
pseudo-header; for IPv4 the kernel fills in the IP id, total length and header checksum
(IP_HDRINCL semantics of IPPROTO_RAW).
"""

from __future__ import annotations

import socket
import struct

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
TTL = 64


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
               window: int, options: bytes = b"", payload: bytes = b"") -> bytes:
    """An IPv4 (4-byte addresses) or IPv6 (16-byte) packet carrying one TCP segment (with
    payload, usually none). options must be padded to a multiple of 4 bytes."""
    if len(options) % 4:
        raise ValueError(f"TCP options must be a multiple of 4 bytes, got {len(options)}")
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                    ((20 + len(options)) // 4) << 4, flags, window, 0, 0) + options + payload
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        head = _IPV4.pack(0x45, 0, _IPV4.size + len(tcp), 0, 0x4000, TTL, socket.IPPROTO_TCP,
                          0, src, dst)
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
        head = _IPV6.pack(6 << 28, len(tcp), socket.IPPROTO_TCP, TTL, src, dst)
    return head + tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
