"""Packet captures: tcpdump inside a network namespace, and the one pcap reader.

    with Capture.in_lab(lab, "gw", "p-origin", f"tcp port {port}") as cap:
        ...                                   # traffic; cap.segments() / cap.wait_for() live
    segs = cap.segments()                     # after the block: everything, flushed

The reader is pure (bytes in, frozen Segments out): `read_pcap(data)` for a whole capture,
`PcapStream` for one arriving in pieces. It reads pcap files with microsecond or nanosecond
timestamps in either byte order, of Ethernet, Linux cooked (SLL and SLL2) and raw-IP link
types, IPv4 and IPv6 (skipping the usual extension headers), and keeps every TCP segment.

The capture never sleeps a fixed time:
- `start()` returns once tcpdump reports "listening on" (its socket is bound and filtered);
- `stop()` first sends a marker frame (ethertype 0x88B5, IEEE local experimental, with a random
  nonce) out of the captured interface from inside the namespace, and waits until the reader
  has seen it come back through tcpdump. A packet tap sees frames in the order they were queued
  to it, so every packet that crossed the interface before stop() was called is in the capture
  once the marker is. Only then is tcpdump stopped. The marker is never returned as a segment.
- a capture that lost packets says so: stop() raises CaptureIncomplete when the kernel dropped
  packets (tcpdump's ring was full) or when the marker never came back (a tc program on the
  interface dropped it): then nothing says that the capture holds every packet.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from kernel.netns import entered
from ops import netns, tcpoptions
from ops.wait import WaitTimeout, wait_until

if TYPE_CHECKING:
    from ops.lab import Lab

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
MASK = 0xFFFFFFFF

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
          b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
_ETH_P_IP, _ETH_P_IPV6, _ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
_IPV6_SKIPPED = {0, 43, 60}  # hop-by-hop, routing, destination options (no fragments)

MARKER_ETHERTYPE = 0x88B5
_MARKER_MAC = bytes.fromhex("027463706370")  # locally administered, unicast, no such host
_MARKER_TAG = b"tcpcp-capture-flush:"


class CaptureError(RuntimeError):
    """tcpdump could not start, or stopped on its own."""


class CaptureIncomplete(CaptureError):
    """The capture is known to miss packets; a test must not read it as the whole truth."""


class PcapError(ValueError):
    """The bytes are not a pcap this reader understands."""


# ---------------------------------------------------------------------- the segment


@dataclass(frozen=True, slots=True)
class Segment:
    """One captured TCP segment. Numbers are host order; `payload` is the part of the data the
    capture kept (snaplen), `payload_len` the segment's real data length (from the IP header).
    `checksum_ok` is None when the segment was captured truncated (no verdict possible)."""

    at: float                 # capture time, seconds since the epoch (time.time())
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes            # raw TCP options
    payload: bytes
    payload_len: int
    ecn: int = 0              # the IP header's ECN bits (0..3)
    checksum_ok: bool | None = None

    @property
    def family(self) -> int:
        return 6 if ":" in self.src else 4

    @property
    def is_ack(self) -> bool:
        return bool(self.flags & ACK)

    @property
    def end_seq(self) -> int:
        """The sequence after this segment (SYN and FIN count one)."""
        extra = bool(self.flags & SYN) + bool(self.flags & FIN)
        return (self.seq + self.payload_len + extra) & MASK

    @property
    def timestamps(self) -> tuple[int, int] | None:
        return tcpoptions.timestamps(self.options)

    @property
    def tsval(self) -> int | None:
        ts = tcpoptions.timestamps(self.options)
        return None if ts is None else ts[0]

    @property
    def tsecr(self) -> int | None:
        ts = tcpoptions.timestamps(self.options)
        return None if ts is None else ts[1]

    @property
    def sack(self) -> tuple[tuple[int, int], ...]:
        return tuple(tcpoptions.sack_blocks(self.options))

    @property
    def wscale(self) -> int | None:
        return tcpoptions.wscale(self.options)

    @property
    def option_kinds(self) -> frozenset[int]:
        return frozenset(tcpoptions.kinds(self.options))


@dataclass(frozen=True, slots=True)
class Record:
    """One pcap record: capture time, the bytes captured and the frame's length on the wire."""

    at: float
    data: bytes
    wire_len: int


# ---------------------------------------------------------------------- the reader (pure)


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_checksum_ok(src: bytes, dst: bytes, tcp: bytes) -> bool:
    """The TCP checksum of a whole segment verifies (src/dst: packed addresses)."""
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    return _sum16(pseudo + tcp) == 0xFFFF


def _l3(frame: bytes, linktype: int) -> tuple[int, bytes] | None:
    """(ethertype, network-layer bytes) of a frame, None for anything else."""
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        proto, off = struct.unpack_from("!H", frame, 12)[0], 14
        while proto == _ETH_P_8021Q and len(frame) >= off + 4:
            proto, off = struct.unpack_from("!H", frame, off + 2)[0], off + 4
        return proto, frame[off:]
    if linktype == LINKTYPE_LINUX_SLL:
        return (struct.unpack_from("!H", frame, 14)[0], frame[16:]) if len(frame) >= 16 else None
    if linktype == LINKTYPE_LINUX_SLL2:
        return (struct.unpack_from("!H", frame, 0)[0], frame[20:]) if len(frame) >= 20 else None
    if linktype == LINKTYPE_RAW:
        if not frame:
            return None
        return (_ETH_P_IP if frame[0] >> 4 == 4 else _ETH_P_IPV6), frame
    raise PcapError(f"expected link type 1, 101, 113 or 276, got {linktype}")


def parse_frame(frame: bytes, linktype: int = LINKTYPE_ETHERNET, at: float = 0.0,
                wire_len: int | None = None) -> Segment | None:
    """The TCP segment in one captured frame, None for anything else (other protocols, IP
    fragments, frames too short to hold a TCP header). wire_len: the frame's length on the
    wire (default: as captured)."""
    got = _l3(frame, linktype)
    if got is None:
        return None
    proto, ip = got
    cut = (len(frame) if wire_len is None else wire_len) - len(frame)  # bytes not captured
    if proto == _ETH_P_IP:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            return None
        ihl = (ip[0] & 0x0F) * 4
        total, frag = struct.unpack_from("!H2xH", ip, 2)
        if frag & 0x3FFF:  # a fragment: no whole TCP header to read
            return None
        src, dst, ecn, l4, end = ip[12:16], ip[16:20], ip[1] & 3, ihl, total
    elif proto == _ETH_P_IPV6:
        if len(ip) < 40 or ip[0] >> 4 != 6:
            return None
        plen, nxt = struct.unpack_from("!HB", ip, 4)
        src, dst, ecn = ip[8:24], ip[24:40], (ip[1] >> 4) & 3
        l4, end = 40, 40 + plen
        while nxt in _IPV6_SKIPPED and len(ip) >= l4 + 2:
            nxt, l4 = ip[l4], l4 + (ip[l4 + 1] + 1) * 8
        if nxt != socket.IPPROTO_TCP:
            return None
    else:
        return None
    tcp = ip[l4:end]
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", tcp)
    doff = (off_flags >> 12) * 4
    if doff < 20:
        return None
    complete = cut <= 0 and len(ip) >= end
    family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
    return Segment(at, socket.inet_ntop(family, src), socket.inet_ntop(family, dst), sport,
                   dport, seq, ack, off_flags & 0xFF, window, bytes(tcp[20:doff]),
                   bytes(tcp[doff:]), max(0, end - l4 - doff), ecn,
                   tcp_checksum_ok(src, dst, tcp) if complete else None)


class PcapStream:
    """A pcap read as it arrives: feed() bytes in any pieces, get the complete records."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._order = ""
        self._unit = 0.0
        self.linktype: int | None = None

    def feed(self, data: bytes) -> list[Record]:
        self._buf += data
        if self.linktype is None:
            if len(self._buf) < 24:
                return []
            magic = bytes(self._buf[:4])
            if magic not in _MAGIC:
                raise PcapError(f"expected a pcap magic number, got {magic.hex()}"
                                + (" (pcapng)" if magic == b"\x0a\x0d\x0d\x0a" else ""))
            self._order, self._unit = _MAGIC[magic]
            self.linktype = struct.unpack_from(self._order + "I", self._buf, 20)[0] & 0x0FFFFFFF
            del self._buf[:24]
        out, off = [], 0
        head = self._order + "IIII"
        while len(self._buf) - off >= 16:
            sec, frac, caplen, wire = struct.unpack_from(head, self._buf, off)
            if len(self._buf) - off - 16 < caplen:
                break
            out.append(Record(sec + frac * self._unit,
                              bytes(self._buf[off + 16:off + 16 + caplen]), wire))
            off += 16 + caplen
        del self._buf[:off]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record (or header) still waiting for the rest."""
        return len(self._buf)

    def segments(self, records: Iterable[Record]) -> list[Segment]:
        assert self.linktype is not None
        return [s for r in records
                if (s := parse_frame(r.data, self.linktype, r.at, r.wire_len)) is not None]


def read_pcap(data: bytes) -> list[Segment]:
    """Every TCP segment of a whole pcap, in capture order."""
    stream = PcapStream()
    records = stream.feed(data)
    if stream.linktype is None:
        raise PcapError(f"expected a pcap header of 24 bytes, got {len(data)}")
    return stream.segments(records)


def read_pcap_file(path: str | os.PathLike[str]) -> list[Segment]:
    return read_pcap(Path(path).read_bytes())


def marker_nonce(frame: bytes, linktype: int) -> bytes | None:
    """The nonce of a capture's flush marker frame, None for any other frame."""
    got = _l3(frame, linktype) if linktype != LINKTYPE_RAW else None
    if got is None or got[0] != MARKER_ETHERTYPE or not got[1].startswith(_MARKER_TAG):
        return None
    return got[1][len(_MARKER_TAG):len(_MARKER_TAG) + 16]


# ---------------------------------------------------------------------- the capture

_STATS = re.compile(rb"(\d+) packets? (captured|received by filter|dropped by kernel)")


class Capture:
    """tcpdump on `interface` inside namespace `ns` (None: this process's namespace), keeping
    what matches `bpf_filter`. What arrived so far can be read at any time (segments(), wait_for());
    after stop() the capture holds everything that crossed the interface before stop().
    path: also write the raw pcap there (for a person to open)."""

    def __init__(self, ns: str | None, interface: str, bpf_filter: str = "", *,
                 snaplen: int = 262144, path: str | os.PathLike[str] | None = None,
                 buffer_kib: int = 32768, allow_drops: bool = False) -> None:
        self.ns, self.interface, self.bpf_filter = ns, interface, bpf_filter
        self.path = Path(path) if path is not None else None
        self.allow_drops = allow_drops
        marker = f"ether proto {MARKER_ETHERTYPE:#x}"
        full = f"({bpf_filter}) or ({marker})" if bpf_filter else ""
        self.argv = ["tcpdump", "-i", interface, "-n", "-U", "--immediate-mode",
                     "-s", str(snaplen), "-B", str(buffer_kib),
                     "--time-stamp-precision=micro", "-w", "-", *([full] if full else [])]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stream = PcapStream()
        self._raw = bytearray()
        self._parsed = 0  # bytes of _raw fed to _stream
        self._segments: list[Segment] = []
        self._pending: set[bytes] = set()  # flush markers sent, not yet seen
        self._markers: set[bytes] = set()  # flush markers seen
        self._lock = threading.Lock()
        self._stderr = bytearray()
        self._listening = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reader_error: BaseException | None = None
        self.stopped = False
        self.flushed = False
        self.stats: dict[str, int] = {}  # tcpdump's closing counts, after stop()

    @classmethod
    def in_lab(cls, lab: Lab, host: str, interface: str, bpf_filter: str = "",
               **kwargs: object) -> Capture:
        """A capture inside a lab host (same keyword arguments as the constructor)."""
        return cls(lab.netns(host), interface, bpf_filter, **kwargs)  # type: ignore[arg-type]

    # -- running
    def start(self, timeout: float = 10.0) -> Self:
        argv = self.argv if self.ns is None else netns.command(self.ns, self.argv)
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()
        proc = self._proc
        try:
            wait_until(lambda: self._listening.is_set() or proc.poll() is not None, timeout,
                       what=f"tcpdump listening on {self.where}")
        except WaitTimeout:
            self._kill()
            raise CaptureError(f"tcpdump on {self.where} did not start in {timeout:g} s: "
                               f"{bytes(self._stderr)!r}") from None
        if not self._listening.is_set():
            self._kill()
            raise CaptureError(f"tcpdump on {self.where} exited {proc.returncode}: "
                               f"{bytes(self._stderr)!r}")
        return self

    @property
    def where(self) -> str:
        return f"{self.ns or 'this namespace'}/{self.interface}"

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            with self._lock:
                self._stderr += line
            if b"listening on" in line:
                self._listening.set()

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        sink = open(self.path, "wb") if self.path is not None else None  # noqa: SIM115
        try:
            while chunk := os.read(fd, 1 << 20):
                if sink is not None:
                    sink.write(chunk)
                with self._lock:
                    # no parsing here (it would take CPU from what is being measured): the
                    # segments are parsed when asked for; a marker is found by its bytes
                    tail = len(self._raw) - len(_MARKER_TAG) - 16
                    self._raw += chunk
                    window = bytes(self._raw[max(0, tail):])
                    for nonce in [n for n in self._pending if _MARKER_TAG + n in window]:
                        self._pending.discard(nonce)
                        self._markers.add(nonce)
        except BaseException as exc:  # reported by stop() and wait_for()
            self._reader_error = exc
        finally:
            if sink is not None:
                sink.close()

    def _send_marker(self, nonce: bytes) -> None:
        ifname = "lo" if self.interface == "any" else self.interface
        frame = (_MARKER_MAC + _MARKER_MAC + struct.pack("!H", MARKER_ETHERTYPE)
                 + (_MARKER_TAG + nonce).ljust(46, b"\0"))

        def send() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
                s.bind((ifname, 0))
                s.send(frame)

        _in_namespace(self.ns, send)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every packet that crossed the interface before this call has been read
        (a marker frame sent now has come back); False when the marker never came back."""
        nonce = secrets.token_bytes(16)
        with self._lock:
            self._pending.add(nonce)
        try:
            self._send_marker(nonce)
        except OSError:
            return False
        try:
            wait_until(lambda: nonce in self._markers or self._dead(), timeout,
                       what=f"flush marker back through tcpdump on {self.where}")
        except WaitTimeout:
            return False
        return nonce in self._markers

    def _dead(self) -> bool:
        return self._proc is None or self._proc.poll() is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Flush, stop tcpdump and check the capture is complete (idempotent)."""
        if self.stopped or self._proc is None:
            return
        self.stopped = True
        proc = self._proc
        self.flushed = not self._dead() and self.flush()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise CaptureError(f"tcpdump on {self.where} did not stop in {timeout:g} s") from None
        for t in self._threads:
            t.join(timeout=timeout)
        if self._reader_error is not None:
            raise CaptureError(f"reading tcpdump's output on {self.where} failed") \
                from self._reader_error
        stats = {kind: int(n) for n, kind in _STATS.findall(bytes(self._stderr))}
        if not stats:
            raise CaptureError(f"tcpdump on {self.where} ended without its statistics "
                               f"(exit {proc.returncode}): {bytes(self._stderr)!r}")
        self.stats = {k.decode(): v for k, v in stats.items()}
        dropped = stats.get(b"dropped by kernel", 0)
        if dropped and not self.allow_drops:
            raise CaptureIncomplete(f"the kernel dropped {dropped} packets of the capture on "
                                    f"{self.where}: {bytes(self._stderr).decode().strip()}")
        if not self.flushed:
            raise CaptureIncomplete(
                f"the flush marker sent out of {self.where} never came back through tcpdump "
                f"(a tc program dropped it?): packets that crossed before stop() may be missing "
                f"({self.stats})")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.stop()
            return
        try:  # the block's own error matters more than an incomplete capture
            self.stop()
        except CaptureError:
            self._kill()

    # -- reading
    def segments(self, src: str | None = None, since: int = 0) -> list[Segment]:
        """The segments captured so far (since a mark(); only those from address src)."""
        with self._lock:
            self._parse()
            found = self._segments[since:]
        return [s for s in found if src is None or s.src == src]

    def mark(self) -> int:
        """A position in the capture, for segments(since=...) and wait_for(since=...)."""
        with self._lock:
            self._parse()
            return len(self._segments)

    def _parse(self) -> None:
        """Parse what arrived since the last call (the lock held)."""
        if self._parsed == len(self._raw):
            return
        records = self._stream.feed(bytes(self._raw[self._parsed:]))
        self._parsed = len(self._raw)
        if records:
            self._segments.extend(self._stream.segments(records))

    def wait_for(self, test: Callable[[Segment], object], since: int = 0,
                 timeout: float = 10.0, what: str = "") -> Segment:
        """The first segment (from since on) for which test() is true, waiting for it."""
        def found() -> Segment | None:
            if self._reader_error is not None:
                raise CaptureError("the capture's reader failed") from self._reader_error
            return next((s for s in self.segments(since=since) if test(s)), None)
        try:
            seg = wait_until(found, timeout, what=what or "a matching segment")
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}; the capture's last segments: "
                                 f"{self.segments(since=since)[-10:]}") from exc
        assert seg is not None
        return seg

    def pcap(self) -> bytes:
        """The raw pcap captured so far (the flush markers included)."""
        with self._lock:
            return bytes(self._raw)


def _in_namespace(ns: str | None, fn: Callable[[], None]) -> None:
    """fn() in a thread inside namespace ns (None: here)."""
    if ns is None:
        fn()
        return
    box: list[BaseException] = []

    def body() -> None:
        try:
            with entered(ns):
                fn()
        except BaseException as exc:  # handed to the caller below
            box.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if box:
        raise box[0]
