"""Checks an ICI must pass before anything is restored from it (the paper's section 7.1).

Restoring is a privileged operation that could forge arbitrary connections, so the ICI is
compared against what this host is configured to serve and what the kernel can honour.
Pure: `check(ici, policy)` returns nothing or raises IciRejected with the reason.

ECN. The ICI keeps the ECN flag (tcpi_options bit 8), but a stock kernel cannot give it back:
TCP_REPAIR_OPTIONS knows MSS, WINDOW, SACK_PERM and TIMESTAMP only (tcp_repair_options_est,
net/ipv4/tcp.c 3468-3516 in 6.12), connect() in repair mode returns before tcp_ecn_send_syn
(tcp_connect, tcp_output.c 4151-4154 vs 4164), and TCP_ECN_OK is otherwise set only from a
SYN, SYN-ACK or request socket (tcp_output.c 354, tcp_minisocks.c 455, tcp_input.c
tcp_ecn_rcv_synack); IP_TOS masks the ECN bits of stream sockets. Measured on 6.18 (lab,
tcp_ecn=1 on both ends): tcpi_options 0xf on origin, 0x7 on the restored socket. A flow without
TCP_ECN_OK ignores the CE marks the peer's ECT packets collect (tcp_ecn_check_ce returns
early) and never echoes ECE, so the peer stops reacting to congestion marks: that is a change
for the network, not only for this connection. Hence RestorePolicy.ecn, default REFUSE
(IciRejected "ecn"); DOWNGRADE restores the flow without ECN and logs a warning, for an
operator who prefers the connection to the marks.

kernel/patches/0005 adds TCPOPT_ECN_REPAIR to TCP_REPAIR_OPTIONS, which sets TCP_ECN_OK on the
repaired socket. kernel.repair probes for it (kernel_restores_ecn) and passes the answer to
check(): where the kernel restores ECN, an ECN flow is accepted under either policy and comes
back with ECN; RestorePolicy.ecn only decides where it cannot.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from kernel.errors import KernelError
from kernel.ici import HALF_CLOSED_STATES, Ici, TcpOption, TcpState
from kernel.seq import after, seq_add

TCP_MIN_MSS = 88
TCP_MAX_MSS = 65535 - 40
TCP_MAX_WSCALE = 14
MAX_WINDOW = 65535 << TCP_MAX_WSCALE

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


RESTORABLE_STATES = frozenset({TcpState.ESTABLISHED}) | HALF_CLOSED_STATES
"""ESTABLISHED and the half-closed states kernel.repair recreates (not TIME_WAIT, CLOSE)."""


class Ecn(enum.Enum):
    """What to do with a flow that negotiated ECN on a kernel that cannot restore it (every
    stock kernel; one with kernel/patches/0005 restores it whatever this says)."""

    REFUSE = "refuse"        # IciRejected: the flow is not restored
    DOWNGRADE = "downgrade"  # restored without ECN (repair.restore logs ecn_downgraded)


class IciRejected(KernelError):
    """An ICI this host refuses to restore; the message says which check failed and why."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"ICI rejected by {check}: {reason}")
        self.check = check


@dataclass(frozen=True, slots=True)
class RestorePolicy:
    """What this host accepts: the local addresses it serves and the queue limits it allows."""

    local_addresses: frozenset[IpAddress]
    max_send_queue: int = 8 << 20
    max_recv_queue: int = 8 << 20
    states: frozenset[TcpState] = RESTORABLE_STATES
    ecn: Ecn = Ecn.REFUSE
    packed: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "packed", frozenset(a.packed for a in self.local_addresses))

    @classmethod
    def serving(cls, *addresses: str) -> RestorePolicy:
        """The default limits, serving the given textual addresses."""
        return cls(frozenset(ipaddress.ip_address(a) for a in addresses))


def _unicast(addr: bytes) -> bool:
    if not any(addr):
        return False
    return addr[0] < 224 if len(addr) == 4 else addr[0] != 0xFF


def check(ici: Ici, policy: RestorePolicy, *, kernel_restores_ecn: bool = False) -> None:
    """Raise IciRejected unless the ICI is safe and possible to restore on this host.

    kernel_restores_ecn: the kernel gives a repaired socket its ECN state (kernel.repair's
    probe); then policy.ecn does not apply."""
    ident, params, win = ici.identity, ici.params, ici.window
    if ici.state not in policy.states:
        allowed = ", ".join(sorted(s.name for s in policy.states))
        raise IciRejected("state", f"expected one of {allowed}, got {ici.state.name}")
    if ident.local_addr not in policy.packed:
        raise IciRejected("local address",
                          f"{ident.local_ip} is not an address this host serves (expected one "
                          f"of: {', '.join(sorted(map(str, policy.local_addresses))) or 'none'})")
    if not _unicast(ident.peer_addr) or ident.peer_port == 0:
        raise IciRejected("peer", f"expected a unicast peer with a port, got "
                          f"{ident.peer_ip}:{ident.peer_port}")
    if (TcpOption.ECN in params.options and not kernel_restores_ecn
            and policy.ecn is Ecn.REFUSE):
        raise IciRejected("ecn", "expected a flow without ECN (this kernel cannot restore "
                          "ECN, one with kernel/patches/0005 can; RestorePolicy.ecn=DOWNGRADE "
                          "restores it without), got one that negotiated ECN")
    if ici.fin_sent and not ici.our_fin:
        raise IciRejected("fin", f"fin_sent: expected False in {ici.state.name}, got True")
    if ici.fin_acked and not ici.fin_sent:
        raise IciRejected("fin", "fin_sent: expected True in FIN_WAIT2, got False")
    if ici.fin_acked and (ici.sent or ici.unsent):
        raise IciRejected("fin", f"send queue: expected empty in FIN_WAIT2 (our FIN acked), "
                          f"got {len(ici.sent) + len(ici.unsent)} bytes")
    if ici.fin_sent and ici.unsent:
        raise IciRejected("fin", f"unsent: expected empty after a transmitted FIN, got "
                          f"{len(ici.unsent)} bytes")
    if not TCP_MIN_MSS <= params.mss_clamp <= TCP_MAX_MSS:
        raise IciRejected("mss", f"expected {TCP_MIN_MSS}..{TCP_MAX_MSS}, got {params.mss_clamp}")
    for name in ("snd_wscale", "rcv_wscale"):
        value = getattr(params, name)
        if value > TCP_MAX_WSCALE:
            raise IciRejected("window scale",
                              f"{name}: expected at most {TCP_MAX_WSCALE}, got {value}")
        if value and TcpOption.WSCALE not in params.options:
            raise IciRejected("window scale", f"{name}: expected 0 as window scaling was not "
                              f"negotiated, got {value}")
    if win.max_window < win.snd_wnd:
        raise IciRejected("window", f"max_window: expected at least snd_wnd ({win.snd_wnd}), "
                          f"got {win.max_window}")
    for name in ("snd_wnd", "max_window", "rcv_wnd"):
        if getattr(win, name) > MAX_WINDOW:
            raise IciRejected("window",
                              f"{name}: expected at most {MAX_WINDOW}, got {getattr(win, name)}")
    if after(win.rcv_wup, ici.rcv_nxt):
        raise IciRejected("window", f"rcv_wup: expected at or before rcv_nxt ({ici.rcv_nxt}), "
                          f"got {win.rcv_wup}")
    if after(win.snd_wl1, seq_add(ici.rcv_nxt, win.rcv_wnd)):
        raise IciRejected("window", f"snd_wl1: expected at or before rcv_nxt + rcv_wnd "
                          f"({ici.rcv_nxt} + {win.rcv_wnd}), got {win.snd_wl1}")
    send_queue = len(ici.sent) + len(ici.unsent)
    if send_queue > policy.max_send_queue:
        raise IciRejected("send queue", f"expected at most {policy.max_send_queue} bytes, "
                          f"got {send_queue}")
    if len(ici.received) > policy.max_recv_queue:
        raise IciRejected("receive queue", f"expected at most {policy.max_recv_queue} bytes, "
                          f"got {len(ici.received)}")
