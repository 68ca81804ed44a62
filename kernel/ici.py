"""The ICI (Internal Connection Information): every value needed to recreate one TCP endpoint.

Pure values, no I/O. Field groups follow CRIU's libsoccr record and DESIGN.md section 2:
identity, parameters fixed at setup, sequence state, the five TCP_REPAIR_WINDOW fields, the
timestamp clock, the queues and the socket options worth keeping. Sequence numbers are plain
ints mod 2**32; the derived ones (snd_nxt, write_seq, receive-queue start) are properties so
the record cannot contradict itself.

Half-closed connections. A FIN takes a sequence number, and snd_una and rcv_nxt are the
kernel's own values, so they count a FIN: rcv_nxt is one past the peer's FIN once it arrived
(CLOSE_WAIT, LAST_ACK, CLOSING) and snd_una one past ours once the peer acknowledged it
(FIN_WAIT2). The queues hold data bytes only, never a FIN. Which FINs exist follows from the
state (OUR_FIN_STATES, PEER_FIN_STATES); the one thing the state does not tell, whether our
FIN has been transmitted, is `fin_sent`.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from kernel.errors import KernelError
from kernel.seq import seq_add

U8 = (1 << 8) - 1
U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


class IciInvalid(KernelError, ValueError):
    """A value does not fit the ICI model (wrong width, wrong address length, negative...)."""


class Family(enum.IntEnum):
    """Address family, portable (not the host's AF_* numbers)."""

    IPV4 = 4
    IPV6 = 6

    @property
    def addr_len(self) -> int:
        return 4 if self is Family.IPV4 else 16


class TcpState(enum.IntEnum):
    """TCP states by the kernel's numbering (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


OUR_FIN_STATES = frozenset({TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING,
                            TcpState.LAST_ACK})
"""States in which the application has shut down writing: our FIN ends the send stream."""
PEER_FIN_STATES = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})
"""States in which the peer's FIN has arrived (rcv_nxt counts it); TIME_WAIT is not restorable."""
HALF_CLOSED_STATES = OUR_FIN_STATES | PEER_FIN_STATES
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2
"""The kernel's userlocks bits, as getsockopt(SO_BUF_LOCK) reports them (Linux >= 5.14)."""


class TcpOption(enum.IntFlag):
    """Options negotiated at setup, bit-compatible with tcp_info's tcpi_options."""

    TIMESTAMPS = 1
    SACK = 2
    WSCALE = 4
    ECN = 8


def _check_uint(name: str, value: int, top: int) -> None:
    if type(value) is not int or not 0 <= value <= top:
        raise IciInvalid(f"{name}: expected an integer in 0..{top}, got {value!r}")


def _check_uints(obj: object, top: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if type(value) is not int or not 0 <= value <= top:
            raise IciInvalid(f"{name}: expected an integer in 0..{top}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Which connection: family, local and peer address (packed bytes) and ports."""

    family: Family
    local_addr: bytes
    local_port: int
    peer_addr: bytes
    peer_port: int

    def __post_init__(self) -> None:
        if not isinstance(self.family, Family):
            raise IciInvalid(f"family: expected Family, got {self.family!r}")
        for name in ("local_addr", "peer_addr"):
            addr = getattr(self, name)
            if not isinstance(addr, bytes) or len(addr) != self.family.addr_len:
                raise IciInvalid(
                    f"{name}: expected {self.family.addr_len} bytes for {self.family.name}, "
                    f"got {addr!r}"
                )
        _check_uint("local_port", self.local_port, U16)
        _check_uint("peer_port", self.peer_port, U16)

    @property
    def local_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.local_addr)

    @property
    def peer_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.peer_addr)

    def __str__(self) -> str:
        return f"{_fmt(self.local_ip, self.local_port)}>{_fmt(self.peer_ip, self.peer_port)}"


def _fmt(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Params:
    """Parameters fixed when the connection was set up."""

    mss_clamp: int
    snd_wscale: int
    rcv_wscale: int
    options: TcpOption

    def __post_init__(self) -> None:
        _check_uint("mss_clamp", self.mss_clamp, U16)
        _check_uint("snd_wscale", self.snd_wscale, U8)
        _check_uint("rcv_wscale", self.rcv_wscale, U8)
        if not isinstance(self.options, TcpOption):
            raise IciInvalid(f"options: expected TcpOption flags, got {self.options!r}")


@dataclass(frozen=True, slots=True)
class Window:
    """The five fields of struct tcp_repair_window."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int

    def __post_init__(self) -> None:
        _check_uints(self, U32, "snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")


USEC_CLOCK = 1
"""Low bit of a TCP_TIMESTAMP value (Linux >= 6.7): set, the connection's clock counts
microseconds; clear, milliseconds. getsockopt reports the mode in it and setsockopt takes the
mode from it, so a value written back must keep the bit it was read with."""


def clock_value(tsval: int, usec: bool) -> int:
    """tsval as a TCP_TIMESTAMP value for a clock in the given mode: the low bit set to the
    mode, rounding up (never below tsval, which the peer's PAWS would drop)."""
    if usec:
        return tsval | USEC_CLOCK
    return seq_add(tsval, tsval & USEC_CLOCK)


@dataclass(frozen=True, slots=True)
class Timestamp:
    """The TCP_TIMESTAMP clock value and the wall-clock instant (ms since the epoch) it was read.

    The value's low bit is the clock's mode (USEC_CLOCK); restoring keeps it."""

    tsval: int
    read_at_ms: int

    def __post_init__(self) -> None:
        _check_uint("tsval", self.tsval, U32)
        _check_uint("read_at_ms", self.read_at_ms, U64)

    @property
    def usec(self) -> bool:
        """True when the clock counts microseconds rather than milliseconds."""
        return bool(self.tsval & USEC_CLOCK)

    def estimate(self, now_ms: int, margin_ms: int) -> int:
        """The value to continue the clock with at now_ms: read value + elapsed + margin, in
        the clock's own unit and mode (an odd value would turn a millisecond clock into a
        microsecond one, 1,000 times too fast for the peer)."""
        ms = max(0, now_ms - self.read_at_ms) + margin_ms
        return clock_value(seq_add(self.tsval, ms * 1000 if self.usec else ms), self.usec)


@dataclass(frozen=True, slots=True)
class SockOpts:
    """Socket options worth keeping.

    sndbuf/rcvbuf are the kernel's sk_sndbuf/sk_rcvbuf as getsockopt(SO_SNDBUF/SO_RCVBUF)
    reports them (the doubled value; 0: not recorded, leave the kernel's). buf_lock holds the
    SO_BUF_LOCK bits (SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK): set where the application fixed the
    size itself, clear where the kernel autotunes it. Restore gives back the sizes and exactly
    these bits, so a connection passed any number of times keeps autotuning where it had it.
    """

    nodelay: bool = False
    keepalive: bool = False
    keepidle: int = 7200
    keepintvl: int = 75
    keepcnt: int = 9
    sndbuf: int = 0
    rcvbuf: int = 0
    buf_lock: int = 0

    def __post_init__(self) -> None:
        for name in ("nodelay", "keepalive"):
            if not isinstance(getattr(self, name), bool):
                raise IciInvalid(f"{name}: expected a bool, got {getattr(self, name)!r}")
        _check_uints(self, U32, "keepidle", "keepintvl", "keepcnt", "sndbuf", "rcvbuf")
        lock = SOCK_SNDBUF_LOCK | SOCK_RCVBUF_LOCK
        if type(self.buf_lock) is not int or self.buf_lock & ~lock or self.buf_lock < 0:
            raise IciInvalid(f"buf_lock: expected bits within {lock:#x}, got {self.buf_lock!r}")


@dataclass(frozen=True, slots=True)
class Ici:
    """One TCP endpoint.

    snd_una is the kernel's (first unacknowledged sequence number); the send queue starts at
    snd_queue_seq, `sent` were transmitted at least once and `unsent` never were. rcv_nxt is
    the kernel's (next sequence number expected); `received` are the data bytes before it (and
    before the peer's FIN, if any) that the application has not read yet. fin_sent: our FIN
    (OUR_FIN_STATES) has been transmitted at least once; it follows every byte of `sent`, and
    `unsent` is then empty.
    """

    identity: Identity
    state: TcpState
    params: Params
    snd_una: int
    rcv_nxt: int
    window: Window
    timestamp: Timestamp
    sent: bytes = b""
    unsent: bytes = b""
    received: bytes = b""
    sockopts: SockOpts = field(default_factory=SockOpts)
    fin_sent: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.state, TcpState):
            raise IciInvalid(f"state: expected TcpState, got {self.state!r}")
        if not isinstance(self.fin_sent, bool):
            raise IciInvalid(f"fin_sent: expected a bool, got {self.fin_sent!r}")
        _check_uint("snd_una", self.snd_una, U32)
        _check_uint("rcv_nxt", self.rcv_nxt, U32)
        for name in ("sent", "unsent", "received"):
            if not isinstance(getattr(self, name), bytes):
                raise IciInvalid(f"{name}: expected bytes, got {type(getattr(self, name))}")

    @property
    def our_fin(self) -> bool:
        """The application shut down writing: our FIN follows the send queue."""
        return self.state in OUR_FIN_STATES

    @property
    def peer_fin(self) -> bool:
        """The peer's FIN has arrived: rcv_nxt counts it, and a reader sees EOF after the queue."""
        return self.state in PEER_FIN_STATES

    @property
    def fin_acked(self) -> bool:
        """The peer acknowledged our FIN (FIN_WAIT2): snd_una counts it, the queue is empty."""
        return self.state is TcpState.FIN_WAIT2

    @property
    def snd_queue_seq(self) -> int:
        """Sequence number of the first byte of the send queue (snd_una less an acked FIN)."""
        return seq_add(self.snd_una, -int(self.fin_acked))

    @property
    def snd_nxt(self) -> int:
        """The kernel's snd_nxt: after the sent bytes, and after our FIN once transmitted."""
        fin = self.our_fin and self.fin_sent
        return seq_add(self.snd_queue_seq, len(self.sent) + int(fin))

    @property
    def write_seq(self) -> int:
        """The kernel's write_seq: the end of the send stream, our FIN included."""
        data_end = seq_add(self.snd_queue_seq, len(self.sent) + len(self.unsent))
        return seq_add(data_end, int(self.our_fin))

    @property
    def rcv_data_end(self) -> int:
        """Sequence number after the last data byte received (the peer's FIN, if it came)."""
        return seq_add(self.rcv_nxt, -int(self.peer_fin))

    @property
    def rcv_queue_seq(self) -> int:
        """Sequence number of the first byte of the receive queue (the kernel's copied_seq)."""
        return seq_add(self.rcv_data_end, -len(self.received))
