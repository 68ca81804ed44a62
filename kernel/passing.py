"""Planned connection passing, the paper's ten steps, between two live hosts.

    origin                                   destination
    1-2 isolate (app stops; Isolation: nftables, or GateIsolation: ACK-gate freeze + quarantine)
    3   dump (sockets stay in repair mode)
    4   the receive queue travels in the ICI
    5   send ICIs + app states  ─────────►   6-7 restore (silent, repair mode) ─┐
                                ◄─────────   restored / refused                  │
    8   switch traffic (the caller's switch())                                   │
        "activate"              ─────────►   9-10 repair off (window probe wakes │
                                ◄─────────        the peer), unsent bytes sent ◄─┘
        discard (silent close); isolation lifted after a grace period

Connections the destination refuses are resumed on the origin (repair off, isolation lifted),
so nothing is passed half-way; a pass that fails before activation resumes everything on the
origin, one that fails during activation leaves the origin's copies isolated (never two live
endpoints). The wire format of the transfer is pure (encode_batch / decode_batch); the sockets,
nftables and BPF calls are the thin shell around it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from kernel import codec, repair
from kernel.errors import KernelError
from kernel.ici import Family, Ici, Identity
from kernel.sanity import RestorePolicy

log = structlog.get_logger("tcpcp.kernel.passing")

BATCH_MAGIC = b"TCPP"
BATCH_VERSION = 1
MAX_APP_STATE = 16 << 20
MAX_BATCH_ITEMS = 1 << 20
MAX_BATCH_BYTES = 1 << 30
"""Largest transfer a receiver reads: a longer announced length is refused before reading."""
_BATCH_HEAD = struct.Struct("!4sHI")
_LEN = struct.Struct("!I")
ACTIVATE, ABORT = b"ACTIVATE\n", b"ABORT\n"


class PassingError(KernelError):
    """A pass could not go on: malformed transfer, refused step or a silent destination.

    `resumed` says the origin took its connections back (usable again by the application)."""

    def __init__(self, message: str, *, resumed: bool = False) -> None:
        super().__init__(message)
        self.resumed = resumed


@dataclass(frozen=True, slots=True)
class Handoff:
    """One connection in transit: its ICI and the application's state for it."""

    ici: Ici
    app_state: bytes = b""


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """The destination's answer to a batch: indices restored, and (index, reason) refused."""

    restored: tuple[int, ...]
    refused: tuple[tuple[int, str], ...]

    def to_json(self) -> bytes:
        return json.dumps({"restored": self.restored, "refused": self.refused}).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> RestoreReport:
        try:
            obj = json.loads(line)
            return cls(tuple(int(i) for i in obj["restored"]),
                       tuple((int(i), str(r)) for i, r in obj["refused"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PassingError(f"destination report: expected JSON restored/refused, "
                               f"got {line[:200]!r}") from exc


# ------------------------------------------------------------------ transfer format (pure)

def encode_batch(items: Sequence[Handoff]) -> bytes:
    """magic | version u16 | count u32 | (ICI len u32, ICI, state len u32, state)* | CRC-32."""
    parts = [_BATCH_HEAD.pack(BATCH_MAGIC, BATCH_VERSION, len(items))]
    for item in items:
        if len(item.app_state) > MAX_APP_STATE:
            raise PassingError(f"application state of {item.ici.identity}: at most "
                               f"{MAX_APP_STATE} bytes, got {len(item.app_state)}")
        raw = codec.encode(item.ici)
        parts += [_LEN.pack(len(raw)), raw, _LEN.pack(len(item.app_state)), item.app_state]
    body = b"".join(parts)
    return body + _LEN.pack(zlib.crc32(body))


def decode_batch(data: bytes) -> list[Handoff]:
    """Inverse of encode_batch; PassingError (or codec.IciDecodeError) for bad bytes."""
    if len(data) < _BATCH_HEAD.size + _LEN.size:
        raise PassingError(f"batch: expected at least {_BATCH_HEAD.size + 4} bytes, "
                           f"got {len(data)}")
    (crc,) = _LEN.unpack_from(data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise PassingError("batch: checksum mismatch")
    magic, version, count = _BATCH_HEAD.unpack_from(data)
    if magic != BATCH_MAGIC or version != BATCH_VERSION:
        raise PassingError(f"batch: expected {BATCH_MAGIC!r} v{BATCH_VERSION}, "
                           f"got {magic!r} v{version}")
    if count > MAX_BATCH_ITEMS:
        raise PassingError(f"batch: at most {MAX_BATCH_ITEMS} items, got {count}")
    pos, end = _BATCH_HEAD.size, len(data) - 4
    out: list[Handoff] = []

    def take(what: str, cap: int) -> bytes:
        nonlocal pos
        if end - pos < 4:
            raise PassingError(f"batch item {len(out)}: {what} length truncated")
        (n,) = _LEN.unpack_from(data, pos)
        if n > cap or end - pos - 4 < n:
            raise PassingError(f"batch item {len(out)}: {what} of {n} bytes does not fit")
        pos += 4 + n
        return data[pos - n : pos]

    for _ in range(count):
        ici = codec.decode(take("ICI", 4 * codec.MAX_QUEUE_BYTES))
        out.append(Handoff(ici, take("application state", MAX_APP_STATE)))
    if pos != end:
        raise PassingError(f"batch: {end - pos} bytes after the last item")
    return out


# ------------------------------------------------------------------ isolation

class FlowIsolation(Protocol):
    """Keeps chosen flows silent in both directions on this host while they are passed."""

    def add(self, flows: Sequence[Identity], socks: Sequence[socket.socket] = ()) -> None: ...

    def remove(self, flows: Iterable[Identity], *, generation: int | None = None) -> None: ...

    def generation_of(self, flow: Identity) -> int | None: ...

    def close(self) -> None: ...


class Isolation:
    """Drops every packet of chosen flows in this network namespace, in both directions.

    nftables sets of (local addr, local port, peer addr, peer port), matched at output and at
    prerouting, so nothing of an isolated connection leaves the host or reaches its socket.
    Needs no BPF (GateIsolation is the design's mechanism). Must be used from a process living
    in the namespace it guards: nft runs as a child, in the calling thread's namespace, and the
    grace-period timer calls it from another thread.
    """

    def __init__(self, table: str = "tcpcp_isolate") -> None:
        self.table = table
        self.flows: dict[Identity, int] = {}  # flow -> generation of the add that isolated it
        self._generation = 0
        self._up = False
        self._lock = threading.Lock()  # the grace-period timer removes flows from its thread

    def _nft(self, script: str) -> None:
        done = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True,
                              check=False)
        if done.returncode != 0:
            raise PassingError(f"nft refused isolation rules: {done.stderr.strip()[:500]}")

    def _setup(self) -> None:
        t = self.table
        self._nft(f"""
table inet {t} {{
  set flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}
  set flows6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}
  chain out {{
    type filter hook output priority -300; policy accept;
    ip saddr . tcp sport . ip daddr . tcp dport @flows4 drop
    ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 drop
  }}
  chain in {{
    type filter hook prerouting priority -300; policy accept;
    ip daddr . tcp dport . ip saddr . tcp sport @flows4 drop
    ip6 daddr . tcp dport . ip6 saddr . tcp sport @flows6 drop
  }}
}}
""")
        self._up = True

    def _elements(self, op: str, flows: Iterable[Identity]) -> str:
        lines = []
        for f in flows:
            s = "flows4" if f.family is Family.IPV4 else "flows6"
            lines.append(f"{op} element inet {self.table} {s} {{ {f.local_ip} . {f.local_port}"
                         f" . {f.peer_ip} . {f.peer_port} }}")
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        """Create the table and its rules now, so that add() only inserts set elements."""
        with self._lock:
            if not self._up:
                self._setup()

    def add(self, flows: Sequence[Identity], socks: Sequence[socket.socket] = ()) -> None:
        """Drop the flows' packets from now on (socks, the flows' sockets, are not needed)."""
        with self._lock:
            new = [f for f in flows if f not in self.flows]
            if not new:
                return
            if not self._up:
                self._setup()
            self._nft(self._elements("add", new))
            self._generation += 1
            self.flows.update(dict.fromkeys(new, self._generation))

    def remove(self, flows: Iterable[Identity], *, generation: int | None = None) -> None:
        """Stop dropping these flows (with generation: only those isolated by that add)."""
        with self._lock:
            gone = [f for f in flows if f in self.flows
                    and (generation is None or self.flows[f] == generation)]
            if gone:
                self._nft(self._elements("delete", gone))
                for f in gone:
                    del self.flows[f]

    def generation_of(self, flow: Identity) -> int | None:
        return self.flows.get(flow)

    def close(self) -> None:
        with self._lock:
            if self._up:
                self._nft(f"delete table inet {self.table}\n")
                self._up = False
                self.flows.clear()

    def __enter__(self) -> Isolation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GateIsolation:
    """Isolation through the ACK gate (egress freeze) and the quarantine (ingress drop).

    Each flow is first guarded at its current rcv_nxt (read in repair mode: nothing the
    kernel has not acknowledged yet gets acknowledged), then frozen: every egress segment is
    dropped at tc egress. Its ingress segments are dropped (and recorded) at tc ingress. Both
    programs stay attached to `ifname` while this object is open.
    """

    def __init__(self, ifname: str = "eth0") -> None:
        from kernel.gate import AckGate
        from kernel.quarantine import Quarantine

        self._stack = contextlib.ExitStack()
        self.gate = self._stack.enter_context(AckGate(ifname))
        self.quarantine = self._stack.enter_context(Quarantine(ifname))
        self.flows: dict[Identity, int] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @staticmethod
    def _flow(f: Identity) -> Any:
        from kernel.bpf.layout import Flow

        return Flow(f.local_ip, f.local_port, f.peer_ip, f.peer_port)

    def add(self, flows: Sequence[Identity], socks: Sequence[socket.socket] = ()) -> None:
        if len(socks) != len(flows):
            raise PassingError("the gate isolates sockets: pass each flow's socket")
        with self._lock:
            self._generation += 1
            for f, sock in zip(flows, socks, strict=True):
                if f in self.flows:
                    continue
                rcv_nxt, wscale = repair.rcv_nxt_and_wscale(sock)
                flow = self._flow(f)
                self.gate.guard(flow, rcv_nxt, wscale)
                self.gate.freeze(flow)
                self.quarantine.observe(flow)
                self.flows[f] = self._generation

    def remove(self, flows: Iterable[Identity], *, generation: int | None = None) -> None:
        with self._lock:
            for f in list(flows):
                if f in self.flows and (generation is None or self.flows[f] == generation):
                    flow = self._flow(f)
                    self.quarantine.release(flow)
                    self.gate.forget(flow)
                    del self.flows[f]

    def generation_of(self, flow: Identity) -> int | None:
        return self.flows.get(flow)

    def close(self) -> None:
        with self._lock:
            self.flows.clear()
            self._stack.close()


def flow_of(sock: socket.socket) -> Identity:
    """The identity of a connected TCP socket."""
    local, peer = sock.getsockname(), sock.getpeername()
    family = Family.IPV6 if sock.family == socket.AF_INET6 else Family.IPV4
    return Identity(family, ipaddress.ip_address(local[0]).packed, local[1],
                    ipaddress.ip_address(peer[0]).packed, peer[1])


# ------------------------------------------------------------------ the two ends

def _recv_line(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536 if len(buf) < limit else 0)
        if not chunk:
            raise PassingError(f"peer of the transfer closed after {len(buf)} bytes of a line")
        buf += chunk
    return bytes(buf)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise PassingError(f"transfer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class PassResult:
    """What a pass achieved: connections now on the destination, and those resumed locally."""

    passed: tuple[Identity, ...]
    resumed: tuple[tuple[Identity, str], ...]
    timings_us: dict[str, float]


def pass_out(
    conns: Sequence[tuple[socket.socket, bytes]],
    destination: tuple[str, int],
    isolation: FlowIsolation,
    switch: Callable[[], None],
    *,
    grace_s: float = 1.0,
    timeout_s: float = 30.0,
) -> tuple[PassResult, list[tuple[socket.socket, bytes]]]:
    """Origin side: pass the (socket, app state) pairs to the destination's receiver.

    The application must not touch these sockets any more. switch() moves the traffic
    (step 8) once everything is restored. Returns the result and the connections the
    destination refused, resumed here and usable again by the application. Isolation of the
    passed flows is lifted grace_s after they are discarded (late packets are dropped, not
    answered with RST).
    """
    t0 = time.perf_counter()
    flows = [flow_of(s) for s, _ in conns]
    isolation.add(flows, [s for s, _ in conns])                        # steps 1-2
    activating = False
    try:
        t_iso = time.perf_counter()
        icis = repair.dump_many((s for s, _ in conns), stay_in_repair=True)  # step 3 (+4)
        t_dump = time.perf_counter()
        batch = encode_batch([Handoff(i, st) for i, (_, st) in zip(icis, conns, strict=True)])
        with socket.create_connection(destination, timeout=timeout_s) as ctl:   # step 5
            ctl.sendall(_LEN.pack(len(batch)) + batch)
            report = RestoreReport.from_json(_recv_line(ctl))           # steps 6-7 there
            t_restored = time.perf_counter()
            refused = dict(report.refused)
            if report.restored:
                try:
                    switch()                                            # step 8
                except BaseException:
                    ctl.sendall(ABORT)
                    raise
            t_switch = time.perf_counter()
            activating = True
            ctl.sendall(ACTIVATE)                                       # steps 9-10 there
            done = json.loads(_recv_line(ctl))
    except BaseException as exc:
        if activating:  # the destination may be live: never resume here as well
            raise PassingError(f"pass to {destination} interrupted during activation, "
                               f"connections left isolated here: {exc}") from exc
        _resume([s for s, _ in conns], flows, isolation)
        raise PassingError(f"pass to {destination} abandoned, connections resumed here: "
                           f"{exc}", resumed=True) from exc
    t_active = time.perf_counter()
    passed, kept = [], []
    for i, ((sock, state), flow) in enumerate(zip(conns, flows, strict=True)):
        if i in refused:
            _resume([sock], [flow], isolation)
            kept.append((sock, state))
        else:
            sock.close()  # still in repair mode since the dump: silent
            passed.append(flow)
    if passed:
        _lift_later(isolation, passed, isolation.generation_of(passed[0]), grace_s)
    timings = {"isolate": (t_iso - t0) * 1e6, "dump": (t_dump - t_iso) * 1e6,
               "transfer_restore": (t_restored - t_dump) * 1e6,
               "switch": (t_switch - t_restored) * 1e6,
               "activate": (t_active - t_switch) * 1e6}
    log.info("passed", to=f"{destination[0]}:{destination[1]}", passed=len(passed),
             resumed=len(kept), activated=done.get("activated"),
             **{k: round(v) for k, v in timings.items()})
    result = PassResult(tuple(passed), tuple((flows[i], r) for i, r in refused.items()), timings)
    return result, kept


def _resume(socks: Sequence[socket.socket], flows: Sequence[Identity],
            isolation: FlowIsolation) -> None:
    """Take connections back: repair off (a window probe wakes the peer), isolation lifted."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(repair.SOL_TCP, repair.TCP_REPAIR, repair.REPAIR_OFF)
    isolation.remove(flows)


def _lift_later(isolation: FlowIsolation, flows: list[Identity], generation: int | None,
                grace_s: float) -> None:
    """Lift the isolation later, unless the flows were isolated again meanwhile."""
    def lift() -> None:
        try:
            isolation.remove(flows, generation=generation)
        except PassingError as exc:
            log.warning("isolation_not_lifted", error=str(exc))

    timer = threading.Timer(grace_s, lift)
    timer.daemon = True
    timer.start()


def receive(
    ctl: socket.socket,
    policy: RestorePolicy,
    *,
    isolation: FlowIsolation | None = None,
    ts_margin_ms: int = repair.DEFAULT_TS_MARGIN_MS,
) -> list[tuple[socket.socket, bytes]]:
    """Destination side of one pass on an accepted transfer connection.

    Restores every connection of the batch (refusing, with the reason, those that fail the
    policy or the kernel), reports, waits for the origin's word and activates. Returns the
    live sockets with their application states; on ABORT discards them silently and returns [].
    """
    (n,) = _LEN.unpack(_recv_exact(ctl, 4))
    if n > MAX_BATCH_BYTES:
        raise PassingError(f"transfer length: expected at most {MAX_BATCH_BYTES} bytes, got {n}")
    items = decode_batch(_recv_exact(ctl, n))
    if isolation is not None:  # a connection coming back: stop dropping its packets here
        isolation.remove(h.ici.identity for h in items)
    restored: list[tuple[int, repair.Restored]] = []
    refused: list[tuple[int, str]] = []
    now_ms = time.time_ns() // 1_000_000
    for i, h in enumerate(items):
        try:
            restored.append((i, repair.restore(h.ici, policy, now_ms=now_ms,
                                               ts_margin_ms=ts_margin_ms)))
        except KernelError as exc:
            refused.append((i, str(exc)))
            log.warning("pass_refused", conn=str(h.ici.identity), error=str(exc))
    try:
        ctl.sendall(RestoreReport(tuple(i for i, _ in restored), tuple(refused)).to_json())
        word = _recv_line(ctl)
    except (OSError, PassingError):
        word = b""
    if word != ACTIVATE:
        for _, r in restored:
            repair.discard_restored(r)
        log.info("pass_aborted", discarded=len(restored), word=word.decode(errors="replace"))
        return []
    live = [(repair.activate(r), items[i].app_state) for i, r in restored]
    with contextlib.suppress(OSError):
        ctl.sendall(json.dumps({"activated": len(live)}).encode() + b"\n")
    log.info("pass_received", activated=len(live), refused=len(refused))
    return live
