"""What the guest tests and the guest benchmark need around a TCP connection: two network
namespaces joined by a veth pair at MTU 1500, sockets made inside them, and a raw injector for
segments the peer's stack would never send. Captures are ops.capture.Capture:

    with VethPair() as pair:
        with Capture(pair.peer_ns, "eth0", "tcp") as cap:
            server, client = pair.connect(6, guard_listen=True)
            ...
            cap.segments(src=pair.origin_addr(6))
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from pyroute2 import IPRoute

from kernel import patch_gate, repair
from ops import netns
from ops.wait import wait_until

T = TypeVar("T")
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_names = itertools.count()

RTAX_RTO_MIN = 13  # the kernel honours the metric only when locked (tcp_rto_min, tcp.h)
ADDRS = {4: ("10.99.0.10", "10.99.0.2", 24), 6: ("fd99::10", "fd99::2", 64)}


class VethPair:
    """Namespaces `origin` and `peer`, each with eth0 (MTU 1500) of one veth pair, IPv4+IPv6."""

    def __init__(self, *, peer_rto_min_ms: int | None = None) -> None:
        """peer_rto_min_ms: the peer's routes to the origin carry this minimum RTO (route
        metric rto_min), so its retransmission timer cannot fire during a test that holds the
        origin's ACKs on a slow guest."""
        tag = f"kg{os.getpid()}x{next(_names)}"
        self._peer_rto_min_ms = peer_rto_min_ms
        self.origin_ns, self.peer_ns = f"{tag}o", f"{tag}p"
        self._tag = tag

    def __enter__(self) -> VethPair:
        try:
            netns.create(self.origin_ns)
            netns.create(self.peer_ns)
            with IPRoute() as ip:
                ip.link("add", ifname=f"{self._tag}a", kind="veth", peer=f"{self._tag}b")
                a = ip.link_lookup(ifname=f"{self._tag}a")[0]
                b = ip.link_lookup(ifname=f"{self._tag}b")[0]
                ip.link("set", index=a, net_ns_fd=self.origin_ns)
                ip.link("set", index=b, net_ns_fd=self.peer_ns)
            self._setup(self.origin_ns, f"{self._tag}a", 0, None)
            self._setup(self.peer_ns, f"{self._tag}b", 1, self._peer_rto_min_ms)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for name in (self.origin_ns, self.peer_ns):
            netns.remove(name)

    @staticmethod
    def _setup(ns: str, ifname: str, side: int, rto_min_ms: int | None) -> None:
        def setup() -> None:
            with IPRoute() as ip:
                idx = ip.link_lookup(ifname=ifname)[0]
                ip.link("set", index=idx, ifname="eth0")
                for conf in ("all", "default", "eth0"):  # no DAD: addresses usable at once
                    Path(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad").write_text("0")
                ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
                ip.link("set", index=idx, mtu=1500, state="up")
                for family, (origin, peer, plen) in ADDRS.items():
                    ip.addr("add", index=idx, address=origin if side == 0 else peer,
                            prefixlen=plen, family=socket.AF_INET if family == 4
                            else socket.AF_INET6)
                    if rto_min_ms is not None and family == 4:
                        # no tail loss probe either: it fires after two smoothed RTTs
                        Path("/proc/sys/net/ipv4/tcp_early_retrans").write_text("0")
                    if rto_min_ms is not None:
                        ip.route("add", dst=f"{origin}/{32 if family == 4 else 128}",
                                 oif=idx, metrics={"rto_min": rto_min_ms,
                                                    "lock": 1 << RTAX_RTO_MIN},
                                 family=socket.AF_INET if family == 4 else socket.AF_INET6)
        run_in(ns, setup)

    def origin_addr(self, family: int) -> str:
        return ADDRS[family][0]

    def peer_addr(self, family: int) -> str:
        return ADDRS[family][1]

    def connect(self, family: int, *, guard_listen: bool = False,
                port: int = 5001) -> tuple[socket.socket, socket.socket]:
        """A connection origin:port <- peer: (accepted socket in origin, client in peer)."""
        af = socket.AF_INET if family == 4 else socket.AF_INET6

        def listen() -> socket.socket:
            lst = socket.socket(af, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((self.origin_addr(family), port))
            lst.listen(4)
            return lst

        listener = run_in(self.origin_ns, listen)
        try:
            if guard_listen:
                patch_gate.PatchGate().guard_listen(listener)
            client = run_in(self.peer_ns, lambda: socket.socket(af, socket.SOCK_STREAM))

            def connected() -> bool:
                # the link may still come up (IPv6 routes): refused or unreachable until then
                err = client.connect_ex((self.origin_addr(family), port))
                if err in (0, errno.EISCONN):
                    return True
                raise OSError(err, os.strerror(err))

            wait_until(connected, 10, what=f"peer connected to origin port {port}")
            server, _ = listener.accept()
        finally:
            listener.close()
        return server, client


def run_in(ns: str, fn: Callable[[], T]) -> T:
    """fn() run by a thread inside namespace ns (sockets it creates stay there)."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            with netns.entered(ns):
                box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def tcp_checksum(src: str, dst: str, segment: bytes) -> int:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(segment))
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", len(segment), socket.IPPROTO_TCP)
    data = pseudo + segment + (b"\0" if len(segment) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def inject(ns: str, src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int,
           payload: bytes, window: int = 1000) -> None:
    """Send one ACK|PSH data segment src -> dst from inside ns through a raw socket."""
    head = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, ack, 5 << 4, TCP_ACK | TCP_PSH,
                       window, 0, 0)
    check = tcp_checksum(src[0], dst[0], head + payload)
    segment = head[:16] + struct.pack("!H", check) + head[18:] + payload
    af = socket.AF_INET if ipaddress.ip_address(src[0]).version == 4 else socket.AF_INET6

    def send() -> None:
        with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
            raw.sendto(segment, (dst[0], 0))

    run_in(ns, send)


# tcp_info's state (include/net/tcp_states.h)
TCP_INFO_STATE_FIN_WAIT1, TCP_INFO_STATE_FIN_WAIT2 = 4, 5
TCP_INFO_STATE_CLOSE, TCP_INFO_STATE_LAST_ACK = 7, 9


def tcp_state(sock: socket.socket) -> int:
    return int(repair.tcp_info(sock).tcpi_state)


@contextlib.contextmanager
def background(fn: Callable[[], object]) -> Iterator[threading.Thread]:
    """fn() in a thread for the duration of the block; its exception fails the block's end."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    yield t
    t.join(timeout=60)
    if errors:
        raise errors[0]
    assert not t.is_alive(), "expected the background task to finish within 60 s"
