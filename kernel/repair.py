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
          TCP_REPAIR_OPTIONS (TCPOPT_ECN_REPAIR too for an ECN flow, where the kernel has
          kernel/patches/0005); TCP_TIMESTAMP (checkpoint + elapsed + margin); receive queue;
          sent part of the send queue; TCP_REPAIR_WINDOW (after the receive queue);
          QUEUE=none; kept socket options.
activate: the FINs of a half-closed connection (below); TCP_REPAIR=0 (window probe) or -1;
          the unsent bytes written by ordinary send(); our FIN if it was never transmitted.

Half-closed connections (CLOSE_WAIT, FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK), after CRIU's
libsoccr and measured here. dump: SIOCOUTQ (write_seq - snd_una) counts our FIN until it is
acked and SIOCOUTQNSD (write_seq - snd_nxt) counts it until it is sent, while the peeked send
queue holds no byte for it; SIOCINQ leaves the peer's FIN out and rcv_nxt counts it. So the
queues are data only, and the ICI records the state and whether our FIN was sent (ici.py).
restore builds the ESTABLISHED socket the data describes (queue sequence numbers before any
FIN; rcv_wup moved back to the data end with rcv_wnd grown by as much, so the right edge stays
where the peer saw it); activate then replays the FINs in the order the state was reached:
- our FIN, when sent: shutdown(SHUT_WR) in repair mode with TCP_REPAIR_QUEUE=send, which
  queues the FIN as already transmitted (tcp_write_xmit skips the wire, tcp_output.c 2781):
  the retransmission timer delivers it if the peer never got it. Never sent: after repair
  off, the unsent bytes then shutdown(SHUT_WR), so it goes out behind them at once.
- the peer's FIN, and the peer's ACK of our FIN (FIN_WAIT2), have no socket option: they are
  injected as the segment the peer sent, through a raw socket to the local address (the
  kernel routes it over loopback to the socket; no byte leaves the host). The kernel's answer
  to an injected FIN is an ACK the peer already has. Injection needs the local address to be
  local, i.e. the traffic switched: activate refuses (RepairError, nothing sent) otherwise,
  because a segment routed elsewhere would draw a RST from whoever holds the address.
  The segments carry no timestamp option: ts_recent stays 0 (TSecr 0, "no echo") until the
  peer's next real segment sets it, and the restored socket accepts them (measured on 6.18).
- order: CLOSE_WAIT, LAST_ACK: peer FIN then ours; CLOSING: ours then the peer's with an ack
  short of our FIN; FIN_WAIT2: ours then the peer's ACK of it. activate checks that the
  socket reached the dumped state.
Buffers: restore sets SO_SNDBUF/SO_RCVBUF to the dumped sizes, grows them only if a queue does
not fit, and finally restores the dumped SO_BUF_LOCK bits (0 gives the buffers back to
autotuning), so passing a connection does not pin or ratchet its buffers.

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

import contextlib
import enum
import errno
import fcntl
import functools
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from kernel import netns
from kernel._repair_cdef import ffi
from kernel.errors import KernelError
from kernel.ici import (
    HALF_CLOSED_STATES,
    OUR_FIN_STATES,
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
from kernel.sanity import Ecn, RestorePolicy, check
from kernel.segment import ACK, FIN, tcp_packet

log = structlog.get_logger(component="tcpcp.kernel.repair")

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
SIOCGSKNS = 0x894C  # an fd of the socket's network namespace
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPOPT_ECN_REPAIR = 0x100
"""TCP_REPAIR_OPTIONS code of kernel/patches/0005: its value is the ECN part of tcpi_options
(TCPI_OPT_ECN sets TCP_ECN_OK). A kernel without the patch accepts the code and ignores it."""
TCPI_OPT_ECN = 8
MAX_TCP_MAXSEG = 32767
"""setsockopt(TCP_MAXSEG) refuses more; TCP_REPAIR_OPTIONS sets the full clamp after connect."""
SO_BUF_LOCK = 72
"""getsockopt: the socket's userlocks (SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK); setsockopt sets
them, 0 re-enabling buffer autotuning (Linux >= 5.14)."""
IP_FREEBIND, IP_TRANSPARENT = 15, 19
IPV6_TRANSPARENT, IPV6_FREEBIND = 75, 78
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
DEFAULT_TS_MARGIN_MS = 100
_FAMILY_AF = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_INT = struct.Struct("i")
_UINT = struct.Struct("I")  # sequence numbers and clock values go in as unsigned 32-bit
_RECV_CHUNK = 64 << 10
"""The receive queue is written in chunks: each send() in repair mode becomes one skb."""
_MAX_BUFFER = 1 << 30
_STATE_TIMEOUT_S = 1.0
_TH_FIN, _TH_ACK = FIN, ACK


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
_DUMPABLE = frozenset({TcpState.ESTABLISHED}) | HALF_CLOSED_STATES


def dump(sock: socket.socket, *, stay_in_repair: bool = False, keep_buffers: bool = True) -> Ici:
    """The ICI of an established or half-closed socket (see the module docstring).

    The caller guarantees nothing writes to or reads from the socket meanwhile (a send in repair
    mode is queued as if already sent). With stay_in_repair the socket is left in repair mode,
    ready for discard(). The buffer sizes and their SO_BUF_LOCK bits are always recorded;
    keep_buffers=False records no sizes (restore then leaves them to the kernel's defaults).
    """
    get, fd = sock.getsockopt, sock.fileno()
    step = "TCP_INFO"
    try:
        info = _struct(_INFO_P, get(SOL_TCP, socket.TCP_INFO, _INFO_SIZE))
        if info.tcpi_state not in _DUMPABLE:
            allowed = ", ".join(sorted(st.name for st in _DUMPABLE))
            raise RepairError("dump", _conn(sock), f"expected a state among {allowed}, got "
                              f"{TcpState(info.tcpi_state).name}")
        state = TcpState(info.tcpi_state)
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
            sndbuf=get(socket.SOL_SOCKET, socket.SO_SNDBUF) if keep_buffers else 0,
            rcvbuf=get(socket.SOL_SOCKET, socket.SO_RCVBUF) if keep_buffers else 0,
            buf_lock=get(socket.SOL_SOCKET, SO_BUF_LOCK),
        )
        step = "TCP_REPAIR=1"
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
    except OSError as exc:
        raise _failure(step, _conn(sock), exc) from exc
    ok = False
    try:
        step = "SIOCINQ"
        inq = _ioctl_int(fd, SIOCINQ)  # data only: the kernel leaves a received FIN out
        step = "SIOCOUTQ"
        outq = _ioctl_int(fd, SIOCOUTQ)  # write_seq - snd_una: counts our FIN until acked
        step = "SIOCOUTQNSD"
        nsd = _ioctl_int(fd, SIOCOUTQNSD)  # write_seq - snd_nxt: counts our FIN until sent
        our_fin = state in OUR_FIN_STATES
        fin_pending = our_fin and state is not TcpState.FIN_WAIT2  # FIN counted in outq
        fin_sent = our_fin and (state is TcpState.FIN_WAIT2 or nsd == 0)
        data_out = outq - int(fin_pending)
        unsent_len = nsd - int(our_fin and not fin_sent)
        step = "TCP_REPAIR_QUEUE send"
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        step = "TCP_QUEUE_SEQ send"
        write_seq = get(SOL_TCP, TCP_QUEUE_SEQ)
        step = "peek send queue"
        send_queue = _peek(sock, data_out)
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
        sent_len = data_out - unsent_len
        wscales = int(info.tcpi_wscales)
        ici = Ici(
            identity=identity,
            state=state,
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
            fin_sent=fin_sent,
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


_ECN_PROBE_PEERS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
_ecn_restorable: bool | None = None


def kernel_restores_ecn() -> bool:
    """Whether this kernel gives a repaired socket its ECN state (kernel/patches/0005),
    probed once per process and cached.

    No error tells: a stock kernel accepts the unknown TCP_REPAIR_OPTIONS code and ignores it
    (measured on 6.18 and in the stock guest), so the probe looks at the effect. A throwaway
    socket is connected in repair mode to loopback (no SYN leaves), given TCPOPT_ECN_REPAIR,
    and asked through TCP_INFO whether it now has TCPI_OPT_ECN; it is closed in repair mode,
    silently. A kernel refusing the option (EINVAL) cannot restore ECN either. Where no
    loopback is reachable (a namespace with lo down) nothing is cached and the answer is False.
    """
    global _ecn_restorable
    if _ecn_restorable is None:
        answer = _probe_ecn_repair()
        if answer is None:
            return False
        _ecn_restorable = answer
        log.info("ecn_repair_probed", restores_ecn=answer)
    return _ecn_restorable


def _probe_ecn_repair() -> bool | None:
    option = ffi.new(_OPTS, [(TCPOPT_ECN_REPAIR, TCPI_OPT_ECN)])
    for af, addr in _ECN_PROBE_PEERS:
        with socket.socket(af, socket.SOCK_STREAM) as sock:  # closed in repair mode: silent
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
                sock.connect((addr, 9))  # no SYN in repair mode; no listener needed
            except OSError:
                continue
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, bytes(ffi.buffer(option)))
            except OSError:
                return False
            return bool(tcp_info(sock).tcpi_options & TCPI_OPT_ECN)
    return None


@functools.lru_cache(maxsize=1024)
def _repair_options(params: Params, ecn: bool = False) -> bytes:
    """The TCP_REPAIR_OPTIONS array for params (few distinct ones per host: cached); with ecn
    (the flow negotiated ECN and kernel_restores_ecn()) also TCPOPT_ECN_REPAIR."""
    # TCPOPT_WINDOW always: connect() in repair mode leaves the locally chosen receive scale
    # in place, so an unscaled connection must be told 0/0 or it advertises windows >> 7.
    opts = [(TCPOPT_MSS, params.mss_clamp),
            (TCPOPT_WINDOW, params.snd_wscale | (params.rcv_wscale << 16))]
    flags = int(params.options)
    if flags & TcpOption.SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if flags & TcpOption.TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    if ecn:
        opts.append((TCPOPT_ECN_REPAIR, TCPI_OPT_ECN))
    arr = ffi.new(_OPTS, opts)
    return bytes(ffi.buffer(arr))


def _data_window(ici: Ici) -> Window:
    """The repair window for the socket restore() builds, whose rcv_nxt is the data end (the
    peer's FIN comes in activate()): rcv_wup no later than that, the right edge unchanged."""
    w, end = ici.window, ici.rcv_data_end
    back = (w.rcv_wup - end) & U32
    if back == 0 or back >= 1 << 31:
        return w
    return Window(w.snd_wl1, w.snd_wnd, w.max_window, min(w.rcv_wnd + back, U32), end)


def _repair_window(w: Window) -> bytes:
    win = ffi.new(_WINDOW_P, (w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup))
    return bytes(ffi.buffer(win))


def _write_queue(sock: socket.socket, data: bytes, *, recv: bool) -> None:
    """Write one queue in repair mode (the socket is non-blocking). When the buffer is full
    (EAGAIN for the send queue, ENOMEM for the receive queue) it is doubled and the write goes
    on: buffers grow only as far as the queue needs."""
    view = memoryview(data)
    bufopt, force = ((socket.SO_RCVBUF, SO_RCVBUFFORCE) if recv
                     else (socket.SO_SNDBUF, SO_SNDBUFFORCE))
    while view:
        try:
            view = view[sock.send(view[:_RECV_CHUNK] if recv else view):]
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise
            size = sock.getsockopt(socket.SOL_SOCKET, bufopt)
            if size >= _MAX_BUFFER:
                raise
            sock.setsockopt(socket.SOL_SOCKET, force, size)  # the kernel doubles it


def _dumped_buffers(sock: socket.socket, so: SockOpts) -> None:
    """Back to the dumped buffer sizes and lock bits once the queues are written, even where
    writing them grew a buffer: a queue larger than its buffer only holds off new data until
    the application drains it, while a grown buffer would be dumped grown by the next pass and
    ratchet up pass after pass (seen: 6 MiB to 33 MiB of receive queue in five passes of a
    full-speed upload). SO_BUF_LOCK 0 gives the sizes back to autotuning."""
    for size, bufopt, force in ((so.sndbuf, socket.SO_SNDBUF, SO_SNDBUFFORCE),
                                (so.rcvbuf, socket.SO_RCVBUF, SO_RCVBUFFORCE)):
        if size and sock.getsockopt(socket.SOL_SOCKET, bufopt) != size:
            sock.setsockopt(socket.SOL_SOCKET, force, size // 2)  # the kernel doubles it
    sock.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, so.buf_lock)


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
    A flow that negotiated ECN gets it back where kernel_restores_ecn(); elsewhere policy.ecn
    decides (refused, or restored without ECN).
    """
    ecn = TcpOption.ECN in ici.params.options and kernel_restores_ecn()
    check(ici, policy, kernel_restores_ecn=ecn)
    if TcpOption.ECN in ici.params.options and not ecn and policy.ecn is Ecn.DOWNGRADE:
        log.warning("ecn_downgraded", conn=str(ici.identity),
                    detail="the kernel cannot restore ECN: the flow continues without it")
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
        step = "buffer sizes"  # the dumped sizes (the kernel doubles what it is given)
        if so.sndbuf:
            setopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, so.sndbuf // 2)
        if so.rcvbuf:
            setopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, so.rcvbuf // 2)
        step = "TCP_QUEUE_SEQ send"  # data only: our FIN comes back in activate()
        setopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        setopt(SOL_TCP, TCP_QUEUE_SEQ, _UINT.pack(ici.snd_queue_seq))
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
        setopt(SOL_TCP, TCP_REPAIR_OPTIONS, _repair_options(params, ecn))
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
                _write_queue(sock, ici.received, recv=True)
            if ici.sent:
                step = "write sent queue"
                setopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
                _write_queue(sock, ici.sent, recv=False)
            sock.setblocking(True)
        step = "buffer sizes and SO_BUF_LOCK"
        _dumped_buffers(sock, so)
        step = "TCP_REPAIR_WINDOW"  # after the receive queue: EINVAL if rcv_wup > rcv_nxt
        setopt(SOL_TCP, TCP_REPAIR_WINDOW, _repair_window(_data_window(ici)))
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
    """Bring back the FINs of a half-closed connection, leave repair mode and write the
    never-sent bytes (and our never-sent FIN); the socket is then an ordinary one in the
    dumped state. A peer's FIN needs the local address to be local here (traffic switched).

    With window_probe the kernel sends a probe on leaving repair mode (ESTABLISHED only),
    which makes the peer answer with an ACK (the paper's step 10 wake-up) even when there is
    nothing to send.
    """
    sock, ici = restored.sock, restored.ici
    state = ici.state
    step = "TCP_REPAIR off"
    try:
        if state in (TcpState.CLOSE_WAIT, TcpState.LAST_ACK):
            step = "peer FIN"
            _inject(sock, ici, _TH_FIN | _TH_ACK, seq=ici.rcv_data_end, ack=ici.snd_queue_seq)
            _await_state(sock, TcpState.CLOSE_WAIT)
        if ici.our_fin and ici.fin_sent:
            step = "our FIN (sent)"
            sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
            sock.shutdown(socket.SHUT_WR)  # queued as transmitted: nothing on the wire
            sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
            if state is TcpState.FIN_WAIT2:
                step = "peer ACK of our FIN"
                _inject(sock, ici, _TH_ACK, seq=ici.rcv_nxt, ack=ici.snd_una)
            elif state is TcpState.CLOSING:
                step = "peer FIN"
                _inject(sock, ici, _TH_FIN | _TH_ACK, seq=ici.rcv_data_end, ack=ici.snd_queue_seq)
            _await_state(sock, state)
        step = "TCP_REPAIR off"
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF if window_probe else REPAIR_OFF_NO_WP)
        if ici.unsent:
            step = "send unsent bytes"  # never blocks: the buffer grows to hold them, as the
            sock.setblocking(False)     # origin's did, and goes back to the dumped lock bits
            _write_queue(sock, ici.unsent, recv=False)
            sock.setblocking(True)
            _dumped_buffers(sock, ici.sockopts)
        if ici.our_fin and not ici.fin_sent:
            step = "our FIN (unsent)"
            sock.shutdown(socket.SHUT_WR)  # after the unsent bytes, on the wire at once
            if state is TcpState.CLOSING:
                step = "peer FIN"
                _inject(sock, ici, _TH_FIN | _TH_ACK, seq=ici.rcv_data_end, ack=ici.snd_queue_seq)
            _await_state(sock, state, also=_PROGRESS.get(state, frozenset()))
    except OSError as exc:
        raise _failure(step, ici.identity, exc) from exc
    return sock


_PROGRESS = {
    TcpState.FIN_WAIT1: frozenset({TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.TIME_WAIT}),
    TcpState.LAST_ACK: frozenset({TcpState.CLOSE}),
    TcpState.CLOSING: frozenset({TcpState.TIME_WAIT}),
}
"""States an unsent FIN may already have led to by the time activate() looks (the peer acks
it within a round trip)."""


def tcp_info(sock: socket.socket) -> Any:
    """The socket's struct tcp_info_prefix (kernel/_repair_cdef.py, through tcpi_segs_in), an
    owned copy: info.tcpi_state, info.tcpi_bytes_acked, ... The kernel fills what it has."""
    raw = sock.getsockopt(SOL_TCP, socket.TCP_INFO, _INFO_SIZE)
    if len(raw) < _INFO_SIZE:
        raise OSError(errno.EPROTO, f"expected {_INFO_SIZE} bytes of tcp_info, the kernel gave "
                      f"{len(raw)}")
    return _struct(_INFO_P, raw)


def tcp_state(sock: socket.socket) -> TcpState:
    """The socket's TCP state (tcp_info)."""
    info = _struct(_INFO_P, sock.getsockopt(SOL_TCP, socket.TCP_INFO, _INFO_SIZE))
    return TcpState(info.tcpi_state)


def _await_state(sock: socket.socket, state: TcpState,
                 also: frozenset[TcpState] = frozenset()) -> None:
    """Poll tcp_info until the socket is in state (an injected segment is processed in softirq,
    normally before sendto returns); OSError(EPROTO) naming both states otherwise."""
    deadline = time.monotonic() + _STATE_TIMEOUT_S
    while True:
        now = tcp_state(sock)
        if now is state or now in also:
            return
        if time.monotonic() >= deadline:
            raise OSError(errno.EPROTO, f"expected state {state.name}, got {now.name}")
        time.sleep(0.0005)


def _segment(ici: Ici, flags: int, seq: int, ack: int) -> tuple[int, bytes, str]:
    """The segment the peer would send (peer -> local, no options), with its IP header:
    (address family, packet, destination)."""
    ident, af = ici.identity, _FAMILY_AF[ici.identity.family]
    wnd = min(0xFFFF, -(-ici.window.snd_wnd >> ici.params.snd_wscale))  # as the peer sent it
    packet = tcp_packet(ident.peer_addr, ident.local_addr, ident.peer_port, ident.local_port,
                        seq, ack, flags, wnd)
    return af, packet, socket.inet_ntop(af, ident.local_addr)


@contextlib.contextmanager
def _in_netns_of(sock: socket.socket) -> Iterator[None]:
    """The calling thread in sock's network namespace (SIOCGSKNS) for the block: the restored
    socket may live in another namespace than the thread activating it."""
    ns = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.setns(ns)
        try:
            yield
        finally:
            netns.setns(home)
    finally:
        os.close(home)
        os.close(ns)


def _inject(sock: socket.socket, ici: Ici, flags: int, *, seq: int, ack: int) -> None:
    """Deliver a segment from the peer to the restored socket over loopback (a raw socket in
    the socket's namespace).

    Refused (EADDRNOTAVAIL, nothing sent) unless the local address is local there: routed
    anywhere else the segment would reach a host without the socket, which answers the peer
    with a RST."""
    af, packet, dst = _segment(ici, flags, seq, ack)
    with _in_netns_of(sock):
        _send_raw(af, packet, dst)


def _send_raw(af: int, packet: bytes, dst: str) -> None:
    with socket.socket(af, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((dst, 0))
        except OSError as exc:
            raise OSError(exc.errno, f"{dst} is not local here yet (switch the traffic before "
                          "activate): a peer's segment cannot be replayed") from exc
    with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(packet, (dst, 0))


def activate_many(
    restored: Iterable[Restored], *, window_probe: bool = True
) -> list[socket.socket]:
    """activate() each restored endpoint."""
    return [activate(r, window_probe=window_probe) for r in restored]


def discard_restored(restored: Restored) -> None:
    """Drop a restored endpoint that was never activated: closed in repair mode, silently."""
    restored.sock.close()
