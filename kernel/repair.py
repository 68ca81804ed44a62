"""Dump and restore live TCP endpoints with TCP_REPAIR: the only module that makes those calls.

Usage, in the orders measured on this kernel (DESIGN.md section 3):

    ici = dump(sock)            # caller guarantees: sock isolated or its application paused
    discard(sock)               # origin: close in repair mode, nothing goes on the wire
    r = restore(ici, policy)    # destination: socket recreated, still in repair mode, silent
    ...switch traffic...
    sock = activate(r)          # repair off (window probe wakes the peer), unsent bytes sent

dump:     TCP_REPAIR=1; SIOCINQ/SIOCOUTQ/SIOCOUTQNSD; QUEUE=send: TCP_QUEUE_SEQ (write_seq),
          recv(MSG_PEEK) (send queue); QUEUE=recv: TCP_QUEUE_SEQ (rcv_nxt), recv(MSG_PEEK);
          QUEUE=none; TCP_TIMESTAMP; TCP_MAXSEG (mss clamp); TCP_REPAIR_WINDOW; TCP_INFO;
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
"""

from __future__ import annotations

import enum
import errno
import fcntl
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

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
IPV6_TRANSPARENT = 75
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
DEFAULT_TS_MARGIN_MS = 100
_FAMILY_AF = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_INT = struct.Struct("i")
_UINT = struct.Struct("I")  # sequence numbers and clock values go in as unsigned 32-bit
_QUEUE_FITS_DEFAULT_BUFFER = 32 << 10
P = ParamSpec("P")
T = TypeVar("T")


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


class _Calls:
    """The kernel calls on one socket; an OSError becomes a RepairError naming the step."""

    __slots__ = ("_name", "sock")

    def __init__(self, sock: socket.socket, name: Identity | None = None) -> None:
        self.sock = sock
        self._name = name

    def _fail(self, step: str, exc: OSError) -> RepairError:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        conn = str(self._name) if self._name is not None else _conn(self.sock)
        return RepairError(step, conn, f"{code} ({exc.strerror})")

    def set(self, step: str, opt: int, value: int | bytes, level: int = SOL_TCP) -> None:
        try:
            self.sock.setsockopt(level, opt, value)
        except OSError as exc:
            raise self._fail(step, exc) from exc

    def get(self, step: str, opt: int) -> int:
        try:
            return self.sock.getsockopt(SOL_TCP, opt)
        except OSError as exc:
            raise self._fail(step, exc) from exc

    def get_struct(self, step: str, opt: int, ctype: str) -> Any:
        try:
            raw = self.sock.getsockopt(SOL_TCP, opt, ffi.sizeof(ctype))
        except OSError as exc:
            raise self._fail(step, exc) from exc
        out = ffi.new(f"{ctype} *")  # owned copy: a cast of from_buffer(raw) would dangle
        ffi.memmove(out, raw, min(len(raw), ffi.sizeof(ctype)))
        return out

    def call(self, step: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise self._fail(step, exc) from exc


def _conn(sock: socket.socket) -> str:
    try:
        return f"{_addr(sock.getsockname())}>{_addr(sock.getpeername())}"
    except OSError:
        return f"fd {sock.fileno()}"


def _addr(a: tuple[object, ...]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = bytearray(_INT.size)
    fcntl.ioctl(sock.fileno(), request, buf)
    return int(_INT.unpack(buf)[0])


def _peek(sock: socket.socket, n: int) -> bytes:
    if n == 0:
        return b""
    data = sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != n:
        raise OSError(errno.EIO, f"peeked {len(data)} of {n} queued bytes")
    return data


def _identity(sock: socket.socket) -> Identity:
    family = Family.IPV6 if sock.family == socket.AF_INET6 else Family.IPV4
    local, peer = sock.getsockname(), sock.getpeername()
    return Identity(family, ipaddress.ip_address(local[0]).packed, local[1],
                    ipaddress.ip_address(peer[0]).packed, peer[1])


def _sockopts(sock: socket.socket, keep_buffers: bool) -> SockOpts:
    return SockOpts(
        nodelay=bool(sock.getsockopt(SOL_TCP, socket.TCP_NODELAY)),
        keepalive=bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
        keepidle=sock.getsockopt(SOL_TCP, socket.TCP_KEEPIDLE),
        keepintvl=sock.getsockopt(SOL_TCP, socket.TCP_KEEPINTVL),
        keepcnt=sock.getsockopt(SOL_TCP, socket.TCP_KEEPCNT),
        sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 if keep_buffers else 0,
        rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 if keep_buffers else 0,
    )


def dump(sock: socket.socket, *, stay_in_repair: bool = False, keep_buffers: bool = False) -> Ici:
    """The ICI of an established socket.

    The caller guarantees nothing writes to or reads from the socket meanwhile (a send in repair
    mode is queued as if already sent). With stay_in_repair the socket is left in repair mode,
    ready for discard(). keep_buffers records SO_SNDBUF/SO_RCVBUF (set them on restore too,
    which turns autotuning off there); otherwise they are left to autotuning.
    """
    k = _Calls(sock)
    info = k.get_struct("TCP_INFO", socket.TCP_INFO, "struct tcp_info_prefix")
    if info.tcpi_state != TcpState.ESTABLISHED:
        raise RepairError("dump", _conn(sock),
                          f"expected state ESTABLISHED, got {TcpState(info.tcpi_state).name}")
    options = TcpOption(info.tcpi_options & 0xF)
    wscales = int(info.tcpi_wscales)
    identity = _identity(sock)
    sockopts = k.call("socket options", _sockopts, sock, keep_buffers)
    k.set("TCP_REPAIR=1", TCP_REPAIR, REPAIR_ON)
    ok = False
    try:
        inq = k.call("SIOCINQ", _ioctl_int, sock, SIOCINQ)
        outq = k.call("SIOCOUTQ", _ioctl_int, sock, SIOCOUTQ)
        unsent_len = k.call("SIOCOUTQNSD", _ioctl_int, sock, SIOCOUTQNSD)
        k.set("TCP_REPAIR_QUEUE send", TCP_REPAIR_QUEUE, SEND_QUEUE)
        write_seq = k.get("TCP_QUEUE_SEQ send", TCP_QUEUE_SEQ)
        send_queue = k.call("peek send queue", _peek, sock, outq)
        k.set("TCP_REPAIR_QUEUE recv", TCP_REPAIR_QUEUE, RECV_QUEUE)
        rcv_nxt = k.get("TCP_QUEUE_SEQ recv", TCP_QUEUE_SEQ)
        recv_queue = k.call("peek receive queue", _peek, sock, inq)
        k.set("TCP_REPAIR_QUEUE none", TCP_REPAIR_QUEUE, NO_QUEUE)
        tsval = k.get("TCP_TIMESTAMP", TCP_TIMESTAMP)
        read_at_ms = time.time_ns() // 1_000_000
        mss_clamp = k.get("TCP_MAXSEG", socket.TCP_MAXSEG)
        win = k.get_struct("TCP_REPAIR_WINDOW", TCP_REPAIR_WINDOW, "struct tcp_repair_window")
        sent_len = outq - unsent_len
        ici = Ici(
            identity=identity,
            state=TcpState.ESTABLISHED,
            params=Params(mss_clamp, wscales & 0xF, wscales >> 4, options),
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
    finally:
        if not (ok and stay_in_repair):
            k.set("TCP_REPAIR off", TCP_REPAIR, REPAIR_OFF_NO_WP)


def dump_many(socks: Iterable[socket.socket], *, stay_in_repair: bool = False) -> list[Ici]:
    """dump() each socket in turn."""
    return [dump(s, stay_in_repair=stay_in_repair) for s in socks]


def discard(sock: socket.socket) -> None:
    """Close a socket without a FIN or RST: enter repair mode, then close.

    If the kernel refuses repair mode the socket is left open (closing it would send a FIN)."""
    _Calls(sock).set("TCP_REPAIR=1 (discard)", TCP_REPAIR, REPAIR_ON)
    sock.close()


def _repair_options(params: Params) -> bytes:
    # TCPOPT_WINDOW always: connect() in repair mode leaves the locally chosen receive scale
    # in place, so an unscaled connection must be told 0/0 or it advertises windows >> 7.
    opts: list[tuple[int, int]] = [
        (TCPOPT_MSS, params.mss_clamp),
        (TCPOPT_WINDOW, params.snd_wscale | (params.rcv_wscale << 16)),
    ]
    if TcpOption.SACK in params.options:
        opts.append((TCPOPT_SACK_PERM, 0))
    if TcpOption.TIMESTAMPS in params.options:
        opts.append((TCPOPT_TIMESTAMP, 0))
    arr = ffi.new("struct tcp_repair_opt[]", len(opts))
    for i, (code, val) in enumerate(opts):
        arr[i].opt_code, arr[i].opt_val = code, val
    return bytes(ffi.buffer(arr))


def _repair_window(w: Window) -> bytes:
    win = ffi.new("struct tcp_repair_window *",
                  {"snd_wl1": w.snd_wl1, "snd_wnd": w.snd_wnd, "max_window": w.max_window,
                   "rcv_wnd": w.rcv_wnd, "rcv_wup": w.rcv_wup})
    return bytes(ffi.buffer(win))


def _write_queue(sock: socket.socket, data: bytes) -> None:
    """Write one queue in repair mode; the socket is non-blocking so a full buffer fails fast."""
    view = memoryview(data)
    while view:
        view = view[sock.send(view):]


def _fit_buffers(k: _Calls, so: SockOpts, send_bytes: int, recv_bytes: int) -> None:
    """Set the buffer sizes the ICI keeps, or grow them so the restored queues fit."""
    for name, opt, force, wanted, needed in (
        ("SO_SNDBUF", socket.SO_SNDBUF, SO_SNDBUFFORCE, so.sndbuf, send_bytes),
        ("SO_RCVBUF", socket.SO_RCVBUF, SO_RCVBUFFORCE, so.rcvbuf, recv_bytes),
    ):
        if wanted:
            k.set(name, opt, wanted, socket.SOL_SOCKET)
        if needed > _QUEUE_FITS_DEFAULT_BUFFER:
            k.set(name, force, 2 * needed, socket.SOL_SOCKET)


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
    ident, params, af = ici.identity, ici.params, _FAMILY_AF[ici.identity.family]
    if sock is None:
        sock = socket.socket(af, socket.SOCK_STREAM)
    elif sock.family != af or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"the prebound socket must be an {af.name} stream socket, got {sock!r}")
    k = _Calls(sock, ident)
    try:
        k.set("SO_REUSEADDR", socket.SO_REUSEADDR, 1, socket.SOL_SOCKET)
        k.set("TCP_REPAIR=1", TCP_REPAIR, REPAIR_ON)  # after SO_REUSEADDR: forces port reuse
        if ident.family is Family.IPV4:  # the service address may arrive only at the switch
            k.set("IP_TRANSPARENT", IP_TRANSPARENT, 1, socket.IPPROTO_IP)
        else:
            k.set("IPV6_TRANSPARENT", IPV6_TRANSPARENT, 1, socket.IPPROTO_IPV6)
        _fit_buffers(k, ici.sockopts, len(ici.sent) + len(ici.unsent), len(ici.received))
        k.set("TCP_REPAIR_QUEUE send", TCP_REPAIR_QUEUE, SEND_QUEUE)
        k.set("TCP_QUEUE_SEQ send", TCP_QUEUE_SEQ, _UINT.pack(ici.snd_una))
        k.set("TCP_REPAIR_QUEUE recv", TCP_REPAIR_QUEUE, RECV_QUEUE)
        k.set("TCP_QUEUE_SEQ recv", TCP_QUEUE_SEQ, _UINT.pack(ici.rcv_queue_seq))
        k.set("TCP_MAXSEG", socket.TCP_MAXSEG, min(params.mss_clamp, MAX_TCP_MAXSEG))
        local = str(ipaddress.ip_address(ident.local_addr))
        if port_mode is PortMode.SAME:
            k.call("bind", sock.bind, (local, ident.local_port))
        elif port_mode is PortMode.ANY:
            k.call("bind", sock.bind, (local, 0))
        k.call("connect", sock.connect, (str(ipaddress.ip_address(ident.peer_addr)),
                                         ident.peer_port))
        k.set("TCP_REPAIR_OPTIONS", TCP_REPAIR_OPTIONS, _repair_options(params))
        if TcpOption.TIMESTAMPS in params.options:
            now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
            tsval = ici.timestamp.estimate(now, ts_margin_ms)
            k.set("TCP_TIMESTAMP", TCP_TIMESTAMP, _UINT.pack(tsval))
        sock.setblocking(False)
        if ici.received:
            k.set("TCP_REPAIR_QUEUE recv", TCP_REPAIR_QUEUE, RECV_QUEUE)
            k.call("write receive queue", _write_queue, sock, ici.received)
        if ici.sent:
            k.set("TCP_REPAIR_QUEUE send", TCP_REPAIR_QUEUE, SEND_QUEUE)
            k.call("write sent queue", _write_queue, sock, ici.sent)
        sock.setblocking(True)
        k.set("TCP_REPAIR_WINDOW", TCP_REPAIR_WINDOW, _repair_window(ici.window))
        k.set("TCP_REPAIR_QUEUE none", TCP_REPAIR_QUEUE, NO_QUEUE)
        k.call("socket options", _apply_sockopts, sock, ici.sockopts)
    except BaseException:
        sock.close()  # still in repair mode, or never connected: nothing goes on the wire
        raise
    return Restored(sock, ici)


def _apply_sockopts(sock: socket.socket, so: SockOpts) -> None:
    sock.setsockopt(SOL_TCP, socket.TCP_NODELAY, int(so.nodelay))
    if so.keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
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
    k = _Calls(restored.sock, restored.ici.identity)
    k.set("TCP_REPAIR off", TCP_REPAIR, REPAIR_OFF if window_probe else REPAIR_OFF_NO_WP)
    if restored.ici.unsent:
        k.call("send unsent bytes", restored.sock.sendall, restored.ici.unsent)
    return restored.sock


def activate_many(
    restored: Iterable[Restored], *, window_probe: bool = True
) -> list[socket.socket]:
    """activate() each restored endpoint."""
    return [activate(r, window_probe=window_probe) for r in restored]


def discard_restored(restored: Restored) -> None:
    """Drop a restored endpoint that was never activated: closed in repair mode, silently."""
    restored.sock.close()
