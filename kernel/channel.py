"""Frames of the passing conversation (kernel/transfer.py) over a TCP socket, with deadlines.

A frame must arrive whole before its deadline: a header trickled a byte at a time, or a body
slower than the floor rate, ends the conversation with ChannelTimeout instead of holding the
reader. The header is checked against the limits before the body is read, and the signature
before the body is parsed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from kernel import transfer
from kernel.transfer import Frame, Kind, Limits, Signer, TransferError

HEADER_TIMEOUT_S = 10.0
MIN_RATE = 1 << 20
"""Bytes per second a frame's body must at least arrive at (plus the header timeout)."""


class ChannelTimeout(TransferError):
    """The other end was too slow (or silent) for a frame's deadline."""


class ChannelClosed(TransferError):
    """The other end closed the conversation in the middle of a frame."""


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelTimeout(f"{what}: {len(buf)} of {n} bytes before the deadline")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(1 << 20, n - len(buf)))
        except TimeoutError:
            raise ChannelTimeout(f"{what}: {len(buf)} of {n} bytes before the deadline") from None
        if not chunk:
            raise ChannelClosed(f"{what}: the other end closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, expect: Kind | Sequence[Kind], signer: Signer,
               limits: Limits, *, timeout_s: float = HEADER_TIMEOUT_S) -> Frame:
    """Read and verify one frame of an expected kind; TransferError says what was wrong."""
    head = _recv_exact(sock, transfer.HEADER.size, time.monotonic() + timeout_s, "frame header")
    kind, length = transfer.read_header(head, limits, expect)
    deadline = time.monotonic() + timeout_s + length / MIN_RATE
    rest = _recv_exact(sock, length, deadline, f"{kind.name} frame")
    return transfer.open_frame(kind, head, rest, signer, limits)


def send_frame(sock: socket.socket, data: bytes, *, timeout_s: float = HEADER_TIMEOUT_S) -> None:
    """Write one encoded frame within timeout_s plus the time MIN_RATE needs for its size."""
    sock.settimeout(timeout_s + len(data) / MIN_RATE)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise ChannelTimeout(f"sending a frame of {len(data)} bytes: the other end does not "
                             "read") from None
