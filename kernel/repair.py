"""Dump and restore live TCP endpoints with TCP_REPAIR: the only module that makes those calls.

Usage, in the orders measured on this kernel (DESIGN.md section 3):

    ici = dump(sock)            # caller guarantees: sock isolated or its application paused
    discard(sock)               # origin: close in repair mode, nothing goes on the wire
    r = restore(ici, policy)    # destination: socket recreated, still in repair mode, silent
    ...switch traffic...
    sock = activate(r)          # repair off (window probe wakes the peer), unsent bytes sent

dump:     TCP_INFO (state, options, window scales) and the kept socket options, without repair
          mode; TCP_REPAIR=1; SIOCINQ/SIOCOUTQ/SIOCOUTQNSD; QUEUE=send: TCP_QUEUE_SEQ
          (write_seq), recv(MSG_PEEK) (send queue); QUEUE=recv: TCP_QUEUE_SEQ (rcv_nxt),
          recv(MSG_PEEK); QUEUE=none; TCP_TIMESTAMP; TCP_MAXSEG (mss clamp); TCP_REPAIR_WINDOW;
          TCP_REPAIR=-1 (off, no window probe) unless the caller keeps it in repair mode.
restore:  sanity check; socket; SO_REUSEADDR; TCP_REPAIR=1 (forces port reuse);
          IP_TRANSPARENT; buffers; TCP_QUEUE_SEQ of both queues; TCP_MAXSEG (before connect);
          bind; connect (no SYN);
          TCP_REPAIR_OPTIONS; TCP_TIMESTAMP (checkpoint + elapsed + margin); receive queue;
          sent part of the send queue; TCP_REPAIR_WINDOW (after the receive queue);
          QUEUE=none; kept socket options.
activate: TCP_REPAIR=0 (window probe) or -1; the unsent bytes written by ordinary send().

A failed restore closes its socket while still in repair mode, which sends nothing: a rejected
or broken ICI leaves no socket and no packet behind.

Found while writing this, beyond DESIGN.md: SO_REUSEADDR after TCP_REPAIR=1 undoes the forced
port reuse repair mode grants (EADDRINUSE next to the listener); TCP_MAXSEG refuses more than
32767 (loopback clamps are 65483); without TCPOPT_WINDOW a connection that negotiated no window
scaling keeps the receive scale connect() chose and advertises windows >> 7, so the peer
stalls; binding the service address before the switch gives it to the host needs
IP_TRANSPARENT (IP_FREEBIND binds, but connect() then fails with ENETUNREACH); and the low bit
of a TCP_TIMESTAMP value is the clock's mode (set: microseconds, Linux >= 6.7), so an estimate
of the wrong parity made the restored clock run 1,000 times too fast (Timestamp.estimate keeps
the bit).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from kernel._repair_cdef import ffi
from kernel.errors import KernelError
from kernel.ici import (
    U32,
    Family,
    Ici,
    Identity,
    Params,
    SockOpts,
    TcpOption,
    TcpState,
    Timestamp,
    Window,
)
from kernel.sanity import RestorePolicy, check

log = structlog.get_logger("tcpcp.kernel.repair")

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WP = 1, 0, -1
NO_QUEUE, RECV_QUEUE, SEND_QUEUE = 0, 1, 2
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
MAX_TCP_MAXSEG = 32767
"""setsockopt(TCP_MAXSEG) refuses more; TCP_REPAIR_OPTIONS sets the full clamp after connect."""
IP_FREEBIND, IP_TRANSPARENT = 15, 19
IPV6_TRANSPARENT, IPV6_FREEBIND = 75, 78
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
DEFAULT_TS_MARGIN_MS = 100
_FAMILY_AF = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_INT = struct.Struct("i")
_UINT = struct.Struct("I")  # sequence numbers and clock values go in as unsigned 32-bit
_QUEUE_FITS_DEFAULT_BUFFER = 32 << 10


class RepairError(KernelError):
    """A TCP_REPAIR step failed; says which step, on which connection, and the kernel's answer."""

    def __init__(self, step: str, conn: str, detail: str) -> None:
        super().__init__(f"{step} on {conn}: {detail}")
        self.step = step


class PortMode(enum.Enum):
    """How the restored socket gets its local port (the paper's section 2.1)."""

    SAME = "same"          # the port in the ICI (no address translation in between)
    PREBOUND = "prebound"  # the socket the caller bound beforehand; the ICI's port is ignored
    ANY = "any"            # any free port the kernel picks


@dataclass(frozen=True, slots=True)
class Restored:
    """A recreated endpoint, still in repair mode: silent until activate(), discardable."""

    sock: socket.socket
    ici: Ici


# Each function below walks its steps in order, naming the current one in `step`; the one
# except clause turns the kernel's OSError into a RepairError saying which step failed.

def _failure(step: str, conn: object, exc: OSError) -> RepairError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return RepairError(step, str(conn), f"{code} ({exc.strerror})")


def _conn(sock: socket.socket) -> str:
    try:
        return f"{_addr(sock.getsockname())}>{_addr(sock.getpeername())}"
    except OSError:
        return f"fd {sock.fileno()}"


def _addr(a: tuple[object, ...]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"


def _ioctl_int(fd: int, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf)
    return int(_INT.unpack(buf)[0])


def _peek(sock: socket.socket, n: int) -> bytes:
    if n == 0:
        return b""
    data = sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != n:
        raise OSError(errno.EIO, f"peeked {len(data)} of {n} queued bytes")
    return data


def _struct(ctype: Any, raw: bytes) -> Any:
    """An owned copy of a kernel structure read with getsockopt."""
    out = ffi.new(ctype)
    ffi.memmove(out, raw, min(len(raw), ffi.sizeof(out[0])))
    return out


_INFO_P = ffi.typeof("struct tcp_info_prefix *")
_INFO_SIZE = ffi.sizeof("struct tcp_info_prefix")
_WINDOW_P = ffi.typeof("struct tcp_repair_window *")
_WINDOW_SIZE = ffi.sizeof("struct tcp_repair_window")
_OPTS = ffi.typeof("struct tcp_repair_opt[]")
_DEFAULT_SOCKOPTS = SockOpts()


def dump(sock: socket.socket, *, stay_in_repair: bool = False, keep_buffers: bool = False) -> Ici:
    """The ICI of an established socket.

    The caller guarantees nothing writes to or reads from the socket meanwhile (a send in repair
    mode is queued as if already sent). With stay_in_repair the socket is left in repair mode,
    ready for discard(). keep_buffers records SO_SNDBUF/SO_RCVBUF (set them on restore too,
    which turns autotuning off there); otherwise they are left to autotuning.
    """
    get, fd = sock.getsockopt, sock.fileno()
    step = "TCP_INFO"
    try:
        info = _struct(_INFO_P, get(SOL_TCP, socket.TCP_INFO, _INFO_SIZE))
        if info.tcpi_state != TcpState.ESTABLISHED:
            raise RepairError("dump", _conn(sock), "expected state ESTABLISHED, got "
                              f"{TcpState(info.tcpi_state).name}")
        step = "addresses"
        family = Family.IPV6 if sock.family == socket.AF_INET6 else Family.IPV4
        local, peer = sock.getsockname(), sock.getpeername()
        af = sock.family
        identity = Identity(family, socket.inet_pton(af, local[0]), local[1],
                            socket.inet_pton(af, peer[0]), peer[1])
        step = "socket options"
        keepalive = bool(get(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        d = _DEFAULT_SOCKOPTS  # keepalive timings are kept only when keepalive is on
        sockopts = SockOpts(
            nodelay=bool(get(SOL_TCP, socket.TCP_NODELAY)),
            keepalive=keepalive,
            keepidle=get(SOL_TCP, socket.TCP_KEEPIDLE) if keepalive else d.keepidle,
            keepintvl=get(SOL_TCP, socket.TCP_KEEPINTVL) if keepalive else d.keepintvl,
            keepcnt=get(SOL_TCP, socket.TCP_KEEPCNT) if keepalive else d.keepcnt,
            sndbuf=get(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 if keep_buffers else 0,
            rcvbuf=get(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 if keep_buffers else 0,
        )
        step = "TCP_REPAIR=1"
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
    except OSError as exc:
        raise _failure(step, _conn(sock), exc) from exc
    ok = False
    try:
        step = "SIOCINQ"
        inq = _ioctl_int(fd, SIOCINQ)
        step = "SIOCOUTQ"
        outq = _ioctl_int(fd, SIOCOUTQ)
        step = "SIOCOUTQNSD"
        unsent_len = _ioctl_int(fd, SIOCOUTQNSD)
        step = "TCP_REPAIR_QUEUE send"
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        step = "TCP_QUEUE_SEQ send"
        write_seq = get(SOL_TCP, TCP_QUEUE_SEQ)
        step = "peek send queue"
        send_queue = _peek(sock, outq)
        step = "TCP_REPAIR_QUEUE recv"
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
        step = "TCP_QUEUE_SEQ recv"
        rcv_nxt = get(SOL_TCP, TCP_QUEUE_SEQ)
        step = "peek receive queue"
        recv_queue = _peek(sock, inq)
        step = "TCP_REPAIR_QUEUE none"
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
        step = "TCP_TIMESTAMP"
        tsval = get(SOL_TCP, TCP_TIMESTAMP)
        read_at_ms = time.time_ns() // 1_000_000
        step = "TCP_MAXSEG"
        mss_clamp = get(SOL_TCP, socket.TCP_MAXSEG)
        step = "TCP_REPAIR_WINDOW"
        win = _struct(_WINDOW_P, get(SOL_TCP, TCP_REPAIR_WINDOW, _WINDOW_SIZE))
        sent_len = outq - unsent_len
        wscales = int(info.tcpi_wscales)
        ici = Ici(
            identity=identity,
            state=TcpState.ESTABLISHED,
            params=Params(mss_clamp, wscales & 0xF, wscales >> 4,
                          TcpOption(info.tcpi_options & 0xF)),
            snd_una=(write_seq - outq) & U32,
            rcv_nxt=rcv_nxt & U32,
            window=Window(win.snd_wl1, win.snd_wnd, win.max_window, win.rcv_wnd, win.rcv_wup),
            timestamp=Timestamp(tsval & U32, read_at_ms),
            sent=send_queue[:sent_len],
            unsent=send_queue[sent_len:],
            received=recv_queue,
            sockopts=sockopts,
        )
        ok = True
        return ici
    except OSError as exc:
        raise _failure(step, identity, exc) from exc
    finally:
        if not (ok and stay_in_repair):
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)
            except OSError as exc:
                raise _failure("TCP_REPAIR off", identity, exc) from exc


def rcv_nxt_and_wscale(sock: socket.socket) -> tuple[int, int]:
    """The socket's rcv_nxt (a brief visit to repair mode, off again without a window probe)
    and its receive window scale; for guarding a live flow at what it has acknowledged."""
    try:
        info = _struct(_INFO_P, sock.getsockopt(SOL_TCP, socket.TCP_INFO, _INFO_SIZE))
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
        try:
            sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
            rcv_nxt = sock.getsockopt(SOL_TCP, TCP_QUEUE_SEQ) & U32
            sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
        finally:
            sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)
    except OSError as exc:
        raise _failure("read rcv_nxt", _conn(sock), exc) from exc
    return rcv_nxt, int(info.tcpi_wscales) >> 4


def dump_many(socks: Iterable[socket.socket], *, stay_in_repair: bool = False) -> list[Ici]:
    """dump() each socket in turn."""
    return [dump(s, stay_in_repair=stay_in_repair) for s in socks]


def discard(sock: socket.socket) -> None:
    """Close a socket without a FIN or RST: enter repair mode, then close.

    If the kernel refuses repair mode the socket is left open (closing it would send a FIN)."""
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
    except OSError as exc:
        raise _failure("TCP_REPAIR=1 (discard)", _conn(sock), exc) from exc
    sock.close()


@functools.lru_cache(maxsize=1024)
def _repair_options(params: Params) -> bytes:
    """The TCP_REPAIR_OPTIONS array for params (few distinct ones per host: cached)."""
    # TCPOPT_WINDOW always: connect() in repair mode leaves the locally chosen receive scale
    # in place, so an unscaled connection must be told 0/0 or it advertises windows >> 7.
    opts = [(TCPOPT_MSS, params.mss_clamp),
            (TCPOPT_WINDOW, params.snd_wscale | (params.rcv_wscale << 16))]
    flags = int(params.options)
    if flags & TcpOption.SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if flags & TcpOption.TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    arr = ffi.new(_OPTS, opts)
    return bytes(ffi.buffer(arr))


def _repair_window(w: Window) -> bytes:
    win = ffi.new(_WINDOW_P, (w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup))
    return bytes(ffi.buffer(win))


def _write_queue(sock: socket.socket, data: bytes) -> None:
    """Write one queue in repair mode; the socket is non-blocking so a full buffer fails fast."""
    view = memoryview(data)
    while view:
        view = view[sock.send(view):]


def restore(
    ici: Ici,
    policy: RestorePolicy,
    *,
    port_mode: PortMode = PortMode.SAME,
    sock: socket.socket | None = None,
    now_ms: int | None = None,
    ts_margin_ms: int = DEFAULT_TS_MARGIN_MS,
) -> Restored:
    """Recreate the endpoint described by ici, silent and in repair mode (see activate()).

    Raises IciRejected (nothing created) if the ICI fails the policy, RepairError (the socket
    closed silently) if the kernel refuses a step. With PortMode.PREBOUND pass the bound socket.
    The timestamp clock continues from the checkpoint: value + (now - read instant) + margin.
    """
    check(ici, policy)
    if (sock is not None) != (port_mode is PortMode.PREBOUND):
        raise ValueError("a socket is passed exactly when port_mode is PREBOUND")
    ident, params = ici.identity, ici.params
    af = _FAMILY_AF[ident.family]
    if sock is None:
        sock = socket.socket(af, socket.SOCK_STREAM)
    elif sock.family != af or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"the prebound socket must be an {af.name} stream socket, got {sock!r}")
    setopt, so = sock.setsockopt, ici.sockopts
    step = "SO_REUSEADDR"
    try:
        setopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        step = "TCP_REPAIR=1"  # after SO_REUSEADDR, which would undo its forced port reuse
        setopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
        step = "IP_TRANSPARENT"  # the service address may arrive only with the switch
        if af == socket.AF_INET:
            setopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        else:
            setopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        step = "buffer sizes"
        send_bytes, recv_bytes = len(ici.sent) + len(ici.unsent), len(ici.received)
        if so.sndbuf:
            setopt(socket.SOL_SOCKET, socket.SO_SNDBUF, so.sndbuf)
        if so.rcvbuf:
            setopt(socket.SOL_SOCKET, socket.SO_RCVBUF, so.rcvbuf)
        if send_bytes > _QUEUE_FITS_DEFAULT_BUFFER:
            setopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, max(2 * send_bytes, so.sndbuf))
        if recv_bytes > _QUEUE_FITS_DEFAULT_BUFFER:
            setopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(2 * recv_bytes, so.rcvbuf))
        step = "TCP_QUEUE_SEQ send"
        setopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        setopt(SOL_TCP, TCP_QUEUE_SEQ, _UINT.pack(ici.snd_una))
        step = "TCP_QUEUE_SEQ recv"
        setopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
        setopt(SOL_TCP, TCP_QUEUE_SEQ, _UINT.pack(ici.rcv_queue_seq))
        step = "TCP_MAXSEG"  # before connect, or the MSS derives from 536
        setopt(SOL_TCP, socket.TCP_MAXSEG, min(params.mss_clamp, MAX_TCP_MAXSEG))
        step = "bind"
        if port_mode is PortMode.SAME:
            sock.bind((socket.inet_ntop(af, ident.local_addr), ident.local_port))
        elif port_mode is PortMode.ANY:
            sock.bind((socket.inet_ntop(af, ident.local_addr), 0))
        step = "connect"  # no SYN in repair mode
        sock.connect((socket.inet_ntop(af, ident.peer_addr), ident.peer_port))
        step = "TCP_REPAIR_OPTIONS"
        setopt(SOL_TCP, TCP_REPAIR_OPTIONS, _repair_options(params))
        if params.options & TcpOption.TIMESTAMPS:
            step = "TCP_TIMESTAMP"
            now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
            setopt(SOL_TCP, TCP_TIMESTAMP,
                   _UINT.pack(ici.timestamp.estimate(now, ts_margin_ms)))
        if ici.received or ici.sent:
            sock.setblocking(False)
            if ici.received:
                step = "write receive queue"
                setopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
                _write_queue(sock, ici.received)
            if ici.sent:
                step = "write sent queue"
                setopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
                _write_queue(sock, ici.sent)
            sock.setblocking(True)
        step = "TCP_REPAIR_WINDOW"  # after the receive queue: EINVAL if rcv_wup > rcv_nxt
        setopt(SOL_TCP, TCP_REPAIR_WINDOW, _repair_window(ici.window))
        step = "TCP_REPAIR_QUEUE none"
        setopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
        step = "socket options"
        if so != _DEFAULT_SOCKOPTS:
            _apply_sockopts(sock, so)
    except BaseException as exc:
        sock.close()  # still in repair mode, or never connected: nothing goes on the wire
        if isinstance(exc, OSError):
            raise _failure(step, ident, exc) from exc
        raise
    return Restored(sock, ici)


def _apply_sockopts(sock: socket.socket, so: SockOpts) -> None:
    """Set the kept options (skipped by restore() when all are the kernel's defaults)."""
    sock.setsockopt(SOL_TCP, socket.TCP_NODELAY, int(so.nodelay))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(so.keepalive))
    for opt, value in ((socket.TCP_KEEPIDLE, so.keepidle), (socket.TCP_KEEPINTVL, so.keepintvl),
                       (socket.TCP_KEEPCNT, so.keepcnt)):
        if value:
            sock.setsockopt(SOL_TCP, opt, value)


def restore_many(
    icis: Iterable[Ici],
    policy: RestorePolicy,
    *,
    port_mode: PortMode = PortMode.SAME,
    now_ms: int | None = None,
    ts_margin_ms: int = DEFAULT_TS_MARGIN_MS,
) -> tuple[list[Restored], list[tuple[Ici, KernelError]]]:
    """restore() each ICI; a refused one is returned with its error and the others go on."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    done: list[Restored] = []
    failed: list[tuple[Ici, KernelError]] = []
    for ici in icis:
        try:
            done.append(restore(ici, policy, port_mode=port_mode, now_ms=now,
                                ts_margin_ms=ts_margin_ms))
        except KernelError as exc:
            log.warning("restore_refused", conn=str(ici.identity), error=str(exc))
            failed.append((ici, exc))
    return done, failed


def activate(restored: Restored, *, window_probe: bool = True) -> socket.socket:
    """Leave repair mode and write the never-sent bytes; the socket is then an ordinary one.

    With window_probe the kernel sends a probe on leaving repair mode, which makes the peer
    answer with an ACK (the paper's step 10 wake-up) even when there is nothing to send.
    """
    sock, ici = restored.sock, restored.ici
    step = "TCP_REPAIR off"
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF if window_probe else REPAIR_OFF_NO_WP)
        if ici.unsent:
            step = "send unsent bytes"
            sock.sendall(ici.unsent)
    except OSError as exc:
        raise _failure(step, ici.identity, exc) from exc
    return sock


def activate_many(
    restored: Iterable[Restored], *, window_probe: bool = True
) -> list[socket.socket]:
    """activate() each restored endpoint."""
    return [activate(r, window_probe=window_probe) for r in restored]


def discard_restored(restored: Restored) -> None:
    """Drop a restored endpoint that was never activated: closed in repair mode, silently."""
    restored.sock.close()
