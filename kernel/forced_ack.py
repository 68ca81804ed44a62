"""Forced ACKs: after a commit, a pure ACK carrying the committed sequence is crafted from what the
gate recorded for the flow (highest seq sent, right edge, highest TSval, TSecr) and sent through a
raw socket, because the kernel has no call that emits an ACK on demand.

The segment leaves through the same tc egress gate as the kernel's own segments, so the gate keeps
ack and TSval monotonic for the flow whichever CPU sends first. `build_ack` and `ack_window` are
pure; `RawSender` is the thin I/O shell (IPPROTO_RAW sockets: send-only, we build the IP header).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from types import TracebackType

from kernel.bpf.layout import Flow
from kernel.errors import KernelError
from kernel.netns import entered
from kernel.segment import ACK, tcp_packet
from kernel.seq import seq_diff

MAX_WINDOW = 0xFFFF


class ForcedAckError(KernelError):
    """A forced ACK could not be built or sent."""


@dataclass(frozen=True, slots=True)
class AckSpec:
    """Every field of a pure ACK for flow (host byte order)."""

    flow: Flow
    seq: int
    ack: int
    window: int
    tsval: int | None = None
    tsecr: int = 0


def ack_window(rcv_edge: int, ack: int, wscale: int) -> int:
    """Window field so that ack + window << wscale reaches rcv_edge (rounded up, capped)."""
    span = max(0, seq_diff(rcv_edge, ack))
    return min(MAX_WINDOW, -(-span >> wscale))


def build_ack(spec: AckSpec) -> bytes:
    """The IP packet (IPv4 or IPv6 header + TCP header, checksum filled in) for spec."""
    f = spec.flow
    options = b""
    if spec.tsval is not None:
        options = b"\x01\x01" + struct.pack("!BBII", 8, 10, spec.tsval, spec.tsecr)
    if not 0 <= spec.window <= MAX_WINDOW:
        raise ForcedAckError(f"window must be in 0..{MAX_WINDOW}, got {spec.window}")
    return tcp_packet(f.local_addr.packed, f.remote_addr.packed, f.local_port, f.remote_port,
                      spec.seq, spec.ack, ACK, spec.window, options)


class RawSender:
    """Send-only raw sockets (one per address family) living in a network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        with entered(netns):
            self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, spec: AckSpec) -> None:
        """Put the ACK described by spec on the wire (through tc egress, hence the gate)."""
        packet = build_ack(spec)
        dst = spec.flow.remote_addr
        try:
            if isinstance(dst, ipaddress.IPv4Address):
                self._v4.sendto(packet, (str(dst), 0))
            else:
                self._v6.sendto(packet, (str(dst), 0, 0, 0))
        except OSError as exc:
            raise ForcedAckError(f"expected to send a forced ACK for {spec.flow}, got {exc}"
                                 ) from exc

    def close(self) -> None:
        self._v4.close()
        self._v6.close()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
