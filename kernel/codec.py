"""The portable ICI wire format: encode an Ici to bytes and decode bytes back, refusing bad input.

Layout (network byte order throughout, version 2):

    header   magic "TCPI" | version u16 | reserved u16 (0) | total length u32
    identity family u8 (4|6) | state u8 | local port u16 | peer port u16 |
             local addr (4|16) | peer addr (4|16)
    params   options u8 | snd_wscale u8 | rcv_wscale u8 | reserved u8 (0) | mss_clamp u16
    seq      snd_una u32 | rcv_nxt u32 | FIN flags u8 (1 our FIN sent)
    window   snd_wl1 u32 | snd_wnd u32 | max_window u32 | rcv_wnd u32 | rcv_wup u32
    clock    tsval u32 | read_at_ms u64
    sockopts flags u8 (1 nodelay, 2 keepalive) | buffer locks u8 (1 sndbuf, 2 rcvbuf) |
             keepidle u32 | keepintvl u32 | keepcnt u32 | sndbuf u32 | rcvbuf u32
    queues   sent length u32 + bytes | unsent length u32 + bytes | received length u32 + bytes
    trailer  CRC-32 (zlib polynomial) u32 of every byte before it

Anything else raises IciDecodeError naming the field and what was expected.

Version 2 (half-closed connections, buffer lock state) added the FIN flags byte and the buffer
locks byte; a version 1 record is refused by its version field (no checkpoint outlives the
connection it describes, so there is nothing to migrate).
"""

from __future__ import annotations

import struct
import zlib

from kernel.errors import KernelError
from kernel.ici import (
    SOCK_RCVBUF_LOCK,
    SOCK_SNDBUF_LOCK,
    Family,
    Ici,
    IciInvalid,
    Identity,
    Params,
    SockOpts,
    TcpOption,
    TcpState,
    Timestamp,
    Window,
)

MAGIC = b"TCPI"
VERSION = 2
MAX_QUEUE_BYTES = 64 << 20
"""Structural cap per queue; the restore policy (kernel.sanity) sets the tighter, configured one."""

_HEADER = struct.Struct("!4sHHI")
_PORTS = struct.Struct("!BBHH")
_PARAMS = struct.Struct("!BBBBH")
_SEQ = struct.Struct("!IIB")
_WINDOW = struct.Struct("!IIIII")
_CLOCK = struct.Struct("!IQ")
_SOCKOPTS = struct.Struct("!BBIIIII")
_U32 = struct.Struct("!I")
_NODELAY, _KEEPALIVE = 1, 2
_FIN_SENT = 1
_BUF_LOCKS = SOCK_SNDBUF_LOCK | SOCK_RCVBUF_LOCK
_KNOWN_OPTIONS = int(TcpOption.TIMESTAMPS | TcpOption.SACK | TcpOption.WSCALE | TcpOption.ECN)


def max_encoded_size(max_send_queue: int, max_recv_queue: int) -> int:
    """The most bytes encode() produces for queues within these limits (an IPv6 identity):
    what a store record must be able to hold for every ICI a RestorePolicy accepts."""
    fixed = (_HEADER.size + _PORTS.size + 2 * 16 + _PARAMS.size + _SEQ.size + _WINDOW.size
             + _CLOCK.size + _SOCKOPTS.size + 3 * _U32.size + _U32.size)
    return fixed + max_send_queue + max_recv_queue


class IciDecodeError(KernelError):
    """Bytes that are not a valid ICI; says which field and what was expected."""

    def __init__(self, field: str, expected: str, got: object) -> None:
        super().__init__(f"ICI field {field}: expected {expected}, got {got!r}")
        self.field = field


def encode(ici: Ici) -> bytes:
    """The portable bytes of one ICI."""
    ident, params, win, ts, so = (
        ici.identity, ici.params, ici.window, ici.timestamp, ici.sockopts,
    )
    for name in ("sent", "unsent", "received"):
        if len(getattr(ici, name)) > MAX_QUEUE_BYTES:
            raise IciInvalid(f"{name}: at most {MAX_QUEUE_BYTES} bytes encodable")
    flags = (_NODELAY if so.nodelay else 0) | (_KEEPALIVE if so.keepalive else 0)
    body = b"".join((
        _PORTS.pack(int(ident.family), int(ici.state), ident.local_port, ident.peer_port),
        ident.local_addr,
        ident.peer_addr,
        _PARAMS.pack(int(params.options), params.snd_wscale, params.rcv_wscale, 0,
                     params.mss_clamp),
        _SEQ.pack(ici.snd_una, ici.rcv_nxt, _FIN_SENT if ici.fin_sent else 0),
        _WINDOW.pack(win.snd_wl1, win.snd_wnd, win.max_window, win.rcv_wnd, win.rcv_wup),
        _CLOCK.pack(ts.tsval, ts.read_at_ms),
        _SOCKOPTS.pack(flags, so.buf_lock, so.keepidle, so.keepintvl, so.keepcnt, so.sndbuf,
                       so.rcvbuf),
        _U32.pack(len(ici.sent)), ici.sent,
        _U32.pack(len(ici.unsent)), ici.unsent,
        _U32.pack(len(ici.received)), ici.received,
    ))
    total = _HEADER.size + len(body) + _U32.size
    head = _HEADER.pack(MAGIC, VERSION, 0, total)
    return head + body + _U32.pack(zlib.crc32(head + body))


class _Reader:
    """A cursor over the body that names the field it failed on."""

    def __init__(self, data: bytes | memoryview, start: int, end: int) -> None:
        self._data = memoryview(data)
        self._pos = start
        self._end = end

    def take(self, field: str, n: int) -> bytes:
        if self._end - self._pos < n:
            raise IciDecodeError(field, f"{n} more bytes", f"{self._end - self._pos} left")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def unpack(self, field: str, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(field, fmt.size))

    def blob(self, field: str) -> bytes:
        (n,) = self.unpack(f"{field} length", _U32)
        if n > MAX_QUEUE_BYTES:
            raise IciDecodeError(f"{field} length", f"at most {MAX_QUEUE_BYTES}", n)
        return self.take(field, n)

    def done(self) -> None:
        if self._pos != self._end:
            raise IciDecodeError("trailer", "the checksum right after the queues",
                                 f"{self._end - self._pos} extra bytes")


def decode(data: bytes | bytearray | memoryview) -> Ici:
    """Parse one ICI; IciDecodeError for anything malformed, truncated, oversized or foreign."""
    data = bytes(data)
    if len(data) < _HEADER.size + _U32.size:
        raise IciDecodeError("header", f"at least {_HEADER.size + _U32.size} bytes",
                             f"{len(data)} bytes")
    magic, version, reserved, total = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IciDecodeError("magic", repr(MAGIC), magic)
    if version != VERSION:
        raise IciDecodeError("version", str(VERSION), version)
    if reserved != 0:
        raise IciDecodeError("header reserved", "0", reserved)
    if total != len(data):
        raise IciDecodeError("total length", f"{len(data)} (the bytes given)", total)
    (crc,) = _U32.unpack_from(data, total - _U32.size)
    if zlib.crc32(data[: total - _U32.size]) != crc:
        raise IciDecodeError("checksum", f"CRC-32 {zlib.crc32(data[:total - 4]):#010x}",
                             f"{crc:#010x}")
    r = _Reader(data, _HEADER.size, total - _U32.size)
    fam_b, state_b, lport, pport = r.unpack("identity", _PORTS)
    try:
        family = Family(fam_b)
    except ValueError:
        raise IciDecodeError("family", "4 or 6", fam_b) from None
    try:
        state = TcpState(state_b)
    except ValueError:
        raise IciDecodeError("state", "a kernel TCP state 1..12", state_b) from None
    laddr = r.take("local address", family.addr_len)
    paddr = r.take("peer address", family.addr_len)
    opts, snd_ws, rcv_ws, pad, mss = r.unpack("params", _PARAMS)
    if opts & ~_KNOWN_OPTIONS:
        raise IciDecodeError("options", f"bits within {_KNOWN_OPTIONS:#x}", opts)
    if pad != 0:
        raise IciDecodeError("params reserved", "0", pad)
    snd_una, rcv_nxt, fin_flags = r.unpack("sequence state", _SEQ)
    if fin_flags & ~_FIN_SENT:
        raise IciDecodeError("FIN flags", f"bits within {_FIN_SENT:#x}", fin_flags)
    window = Window(*r.unpack("repair window", _WINDOW))
    tsval, read_at = r.unpack("timestamp clock", _CLOCK)
    flags, buf_lock, keepidle, keepintvl, keepcnt, sndbuf, rcvbuf = r.unpack("socket options",
                                                                             _SOCKOPTS)
    if flags & ~(_NODELAY | _KEEPALIVE):
        raise IciDecodeError("socket option flags", "bits within 0x3", flags)
    if buf_lock & ~_BUF_LOCKS:
        raise IciDecodeError("buffer locks", f"bits within {_BUF_LOCKS:#x}", buf_lock)
    sent = r.blob("sent queue")
    unsent = r.blob("unsent queue")
    received = r.blob("receive queue")
    r.done()
    try:
        return Ici(
            identity=Identity(family, laddr, lport, paddr, pport),
            state=state,
            params=Params(mss, snd_ws, rcv_ws, TcpOption(opts)),
            snd_una=snd_una,
            rcv_nxt=rcv_nxt,
            window=window,
            timestamp=Timestamp(tsval, read_at),
            sent=sent,
            unsent=unsent,
            received=received,
            sockopts=SockOpts(bool(flags & _NODELAY), bool(flags & _KEEPALIVE), keepidle,
                              keepintvl, keepcnt, sndbuf, rcvbuf, buf_lock),
            fin_sent=bool(fin_flags & _FIN_SENT),
        )
    except IciInvalid as exc:
        raise IciDecodeError("value", "values the ICI model accepts", str(exc)) from None
