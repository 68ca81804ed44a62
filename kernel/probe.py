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
from kernel.segment import ACK, tcp_packet
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


def send_probe(ici: Ici, tsval: int) -> None:
    """Send the probe through a raw socket of the calling thread's network namespace (where
    the service address now routes to: take the traffic over first)."""
    af = _AF[ici.identity.family]
    dst = socket.inet_ntop(af, ici.identity.peer_addr)
    with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(probe_packet(ici, tsval), (dst, 0))
