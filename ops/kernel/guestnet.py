"""What the guest tests and the guest benchmark need around a TCP connection: two network
namespaces joined by a veth pair at MTU 1500, sockets made inside them, an AF_PACKET capture of
the segments on the peer's side of the wire, and a raw injector for segments the peer's stack
would never send.

    with VethPair() as pair:
        with Capture(pair.peer_ns, "eth0") as cap:
            server, client = pair.connect(6, guard_listen=True)
            ...
            cap.segments(src=pair.origin_addr(6))
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from pyroute2 import IPRoute

from kernel import patch_gate
from ops import netns, tcpoptions

T = TypeVar("T")
ETH_P_ALL = 0x0003
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_names = itertools.count()

ADDRS = {4: ("10.99.0.10", "10.99.0.2", 24), 6: ("fd99::10", "fd99::2", 64)}


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment seen on the wire (host byte order; SACK blocks as (start, end))."""

    at: float
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload_len: int
    wscale: int | None
    sack: tuple[tuple[int, int], ...]

    @property
    def is_ack(self) -> bool:
        return bool(self.flags & TCP_ACK)


def parse_frame(frame: bytes, at: float) -> Segment | None:
    """The TCP segment in an Ethernet frame, or None for anything else."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == socket.IPPROTO_TCP:
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(
            socket.AF_INET, ip[16:20])
        tcp, tcp_len = ip[ihl:total], total - ihl
    elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == socket.IPPROTO_TCP:
        plen = struct.unpack("!H", ip[4:6])[0]
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(
            socket.AF_INET6, ip[24:40])
        tcp, tcp_len = ip[40:40 + plen], plen
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, off_flags, window = struct.unpack("!HHIIHH", tcp[:16])
    doff = (off_flags >> 12) * 4
    wscale, sack = tcpoptions.wscale(tcp[20:doff]), tuple(tcpoptions.sack_blocks(tcp[20:doff]))
    return Segment(at, src, dst, sport, dport, seq, ack, off_flags & 0x3F, window,
                   tcp_len - doff, wscale, sack)


class VethPair:
    """Namespaces `origin` and `peer`, each with eth0 (MTU 1500) of one veth pair, IPv4+IPv6."""

    def __init__(self) -> None:
        tag = f"kg{os.getpid()}x{next(_names)}"
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
            self._setup(self.origin_ns, f"{self._tag}a", 0)
            self._setup(self.peer_ns, f"{self._tag}b", 1)
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
    def _setup(ns: str, ifname: str, side: int) -> None:
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
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.connect((self.origin_addr(family), port))
                    break
                except OSError:  # the link may still come up (IPv6 routes)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
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


class Capture:
    """Every TCP segment crossing ifname inside ns, in arrival order, while the context is open."""

    def __init__(self, ns: str, ifname: str = "eth0") -> None:
        self.sock = run_in(ns, lambda: self._open(ifname))
        self._segments: list[Segment] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _open(ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: drop no frame
        s.bind((ifname, 0))
        s.settimeout(0.1)
        return s

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            seg = parse_frame(frame, time.monotonic())
            if seg is not None:
                with self._lock:
                    self._segments.append(seg)

    def segments(self, src: str | None = None, since: int = 0) -> list[Segment]:
        with self._lock:
            found = self._segments[since:]
        return [s for s in found if src is None or s.src == src]

    def mark(self) -> int:
        with self._lock:
            return len(self._segments)

    def wait_for(self, test: Callable[[Segment], bool], since: int = 0,
                 timeout: float = 10.0) -> Segment:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seg in self.segments(since=since):
                if test(seg):
                    return seg
            time.sleep(0.01)
        raise AssertionError(f"expected a matching segment within {timeout}s, saw "
                             f"{self.segments(since=since)[-10:]}")


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
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def wait_until(test: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {what or 'the condition'} within {timeout}s")
        time.sleep(0.01)


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
