"""Checks an ICI must pass before anything is restored from it (the paper's section 7.1).

Restoring is a privileged operation that could forge arbitrary connections, so the ICI is
compared against what this host is configured to serve and what the kernel can honour.
Pure: `check(ici, policy)` returns nothing or raises IciRejected with the reason.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from kernel.errors import KernelError
from kernel.ici import Ici, TcpOption, TcpState
from kernel.seq import after, seq_add

TCP_MIN_MSS = 88
TCP_MAX_MSS = 65535 - 40
TCP_MAX_WSCALE = 14
MAX_WINDOW = 65535 << TCP_MAX_WSCALE

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IciRejected(KernelError):
    """An ICI this host refuses to restore; the message says which check failed and why."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"ICI rejected by {check}: {reason}")
        self.check = check


@dataclass(frozen=True, slots=True)
class RestorePolicy:
    """What this host accepts: the local addresses it serves and the queue limits it allows."""

    local_addresses: frozenset[IpAddress]
    max_send_queue: int = 16 << 20
    max_recv_queue: int = 16 << 20
    states: frozenset[TcpState] = frozenset({TcpState.ESTABLISHED})
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


def check(ici: Ici, policy: RestorePolicy) -> None:
    """Raise IciRejected unless the ICI is safe and possible to restore on this host."""
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
