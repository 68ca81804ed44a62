"""Lab helpers for the ACK-gate tests and benchmarks (ops/bench/gateloss.py): a gated receiver
that commits by a CommitPolicy, an uploader run in the peer, the peer's TCP counters and a lossy
link (a gateway program dropping random data segments). Captures: ops/capture.py."""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from checkpointer.commit_policy import (
    CommitPolicy,
    PolicyState,
    Read,
    Tick,
    WouldBlock,
    committed_seq,
    decide,
    next_deadline,
)
from kernel import repair
from kernel.bpf.layout import Flow
from kernel.gatebackend import Gate, open_gate, socket_flow
from kernel.ici import TcpOption
from kernel.patch_gate import Backend
from kernel.tcfilter import Direction, TcHook, TcTarget
from ops import labfilter
from ops.capture import Capture
from ops.lab import Lab
from ops.labfilter import Insn

UPLOADER = r"""
import hashlib, socket, sys
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.connect((host, port))
if len(sys.argv) > 4:  # wait for the server's go (one byte) before sending
    assert s.recv(1) == b"g"
block = bytes(range(256)) * 256
digest = hashlib.sha256()
sent = 0
i = 0
while sent < total:
    chunk = block[i % 251:][: min(65536 - i % 251, total - sent)]
    s.sendall(chunk)
    digest.update(chunk)
    sent += len(chunk)
    i += 1
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(digest.hexdigest(), flush=True)
"""


@dataclass
class Received:
    """What the gated receiver saw: bytes, digest, the commits (wall time, seq) and the flow."""

    flow: Flow | None = None
    nbytes: int = 0
    sha256: str = ""
    commits: list[tuple[float, int]] = field(default_factory=list)
    commit_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def listener(family: int, port: int) -> socket.socket:
    """A listening socket on the origin's service address (call inside the origin)."""
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::" if family == 6 else "0.0.0.0", port))
    srv.listen(8)
    return srv


@contextlib.contextmanager
def guarded_connection(lab: Lab, gate: Gate | None, port: int, family: int = 4
                       ) -> Iterator[tuple[socket.socket, socket.socket, int | None]]:
    """A connection from the peer to the service address on port, accepted by the origin from a
    listener the gate guards (gate None: not guarded). Yields (origin socket, peer socket, the
    committed sequence at the start or None), both sockets with 10 s timeouts; the listener is
    closed when the block ends."""
    srv = lab.call("origin", listener, family, port)
    try:
        if gate is not None:
            gate.guard_listen(srv)
        accept = lab.submit("origin", srv.accept)
        peer = lab.call("peer", socket.create_connection, (lab.service(family), port), 10)
        conn, _ = accept.result(timeout=10)
        conn.settimeout(10)
        base = None if gate is None else gate.committed_seq(conn)
        if gate is not None and base is None:
            raise RuntimeError(f"expected the guarded listener to gate {socket_flow(conn)}, "
                               f"got an ungated connection")
        yield conn, peer, base
    finally:
        srv.close()


def receive_gated(srv: socket.socket, gate: Gate | None, policy: CommitPolicy,
                  out: Received, timeout: float = 120.0, reader: Reader | None = None,
                  digest: bool = True) -> Received:
    """Accept one connection from a listener the gate guards (gate None: ungated) and read it to
    the end, committing by policy. Commits are recorded with the wall-clock time taken just
    before the gate moves."""
    srv.settimeout(timeout)
    conn, _ = srv.accept()
    base = 0
    if gate is not None:
        committed = gate.committed_seq(conn)
        assert committed is not None, f"guarded listener did not gate {socket_flow(conn)}"
        base = committed
    return read_gated(conn, base, gate, policy, out, timeout, reader, digest)


@dataclass(frozen=True, slots=True)
class Reader:
    """How the receiving application reads: at most chunk bytes per read, then think_s seconds
    of work. The default drains the socket; a slow one keeps data queued, so it rarely finds the
    socket empty and its commits come from the policy's timer or byte threshold."""

    chunk: int = 1 << 20
    think_s: float = 0.0


def read_gated(conn: socket.socket, base: int, gate: Gate | None,
               policy: CommitPolicy, out: Received, timeout: float = 120.0,
               reader: Reader | None = None, digest: bool = True) -> Received:
    """Read an accepted connection to the end, committing base + bytes read by policy, answer
    one byte and close it. digest=False skips the sha256 (benchmarks: off the hot path)."""
    reader = reader or Reader()
    t0 = time.monotonic()
    out.flow = socket_flow(conn)
    conn.setblocking(False)
    hasher = hashlib.sha256() if digest else None
    state = PolicyState()
    buf = bytearray(reader.chunk)
    deadline = time.monotonic() + timeout

    def commit_if(reason: object) -> None:
        if reason is None:
            return
        name = getattr(reason, "value", str(reason))
        out.commit_reasons[name] = out.commit_reasons.get(name, 0) + 1
        if gate is not None:
            seq = committed_seq(base, state.committed, state.eof_committed)
            out.commits.append((time.time(), seq))
            gate.commit(conn, seq)

    while True:
        try:
            n = conn.recv_into(buf)
        except BlockingIOError:
            state, reason = decide(policy, state, WouldBlock(time.monotonic()))
            commit_if(reason)
            due = next_deadline(policy, state)
            wait = 0.5 if due is None else max(0.0, due - time.monotonic())
            select.select([conn], [], [], wait)
            state, reason = decide(policy, state, Tick(time.monotonic()))
            commit_if(reason)
            if time.monotonic() > deadline:
                raise TimeoutError(f"upload stalled at {state.consumed} bytes") from None
            continue
        if hasher is not None:
            hasher.update(memoryview(buf)[:n])
        if reader.think_s and n:
            time.sleep(reader.think_s)
        state, reason = decide(policy, state, Read(n, time.monotonic()))
        commit_if(reason)
        if n == 0:
            break
    state, reason = decide(policy, state, WouldBlock(time.monotonic()))
    commit_if(reason)
    out.seconds = time.monotonic() - t0
    out.nbytes = state.consumed
    out.sha256 = hasher.hexdigest() if hasher is not None else ""
    conn.setblocking(True)
    conn.sendall(b"k")
    conn.close()
    return out


def observe_for(seconds: float) -> None:
    """Let `seconds` pass while something must NOT happen (no ACK leaves, no byte moves, no
    packet crosses). The absence of an event is no condition one can wait for, so this window is
    fixed; it is sized from the timer that would make the event happen if the bug existed (the
    delayed-ACK timer, a retransmission). Callers read their counters and captures at both ends
    of this same window."""
    time.sleep(seconds)


def recv_exactly(sock: socket.socket, n: int, timeout: float | None = None) -> bytes:
    """Read exactly n bytes (timeout, when given, is set on sock first); EOFError naming how
    many came when the stream ends before."""
    if timeout is not None:
        sock.settimeout(timeout)
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(65536, n - len(data)))
        if not chunk:
            raise EOFError(f"expected {n} bytes, the stream ended after {len(data)}")
        data += chunk
    return bytes(data)


def uploader_argv(host: str, port: int, total: int, wait_for_go: bool = False) -> list[str]:
    """The uploader's command line; wait_for_go: it sends only after reading b"g"."""
    return [sys.executable, "-c", UPLOADER, host, str(port), str(total),
            *(["go"] if wait_for_go else [])]


def expected_sha256(total: int) -> str:
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    sent = i = 0
    while sent < total:
        chunk = block[i % 251:][: min(65536 - i % 251, total - sent)]
        digest.update(chunk)
        sent += len(chunk)
        i += 1
    return digest.hexdigest()


# ---------------------------------------------------------------------- capture
# Captures are ops.capture.Capture (e.g. Capture.in_lab(lab, "gw", "p-origin", filter,
# snaplen=200)). What follows keeps ops/bench/ackgate.py working until it moves there too.


def gateway_capture(lab: Lab, bpf_filter: str, interface: str = "p-origin",
                    path: Path | None = None) -> Capture:
    """A capture on the gateway (outside the origin), headers only (200 bytes a frame: a 50 MB
    upload stays cheap to read), not yet started."""
    return Capture.in_lab(lab, "gw", interface, bpf_filter, snaplen=200, path=path)


def nstat(lab_run: object, host: str, counter: str) -> int:
    """Absolute value of a kernel SNMP counter in a lab host (nstat -az, no history update)."""
    result = lab_run(host, ["nstat", "-asz", counter], capture_output=True, text=True,  # type: ignore[operator]
                     check=True)
    for line in result.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == counter:
            return int(parts[1])
    return 0


# ---------------------------------------------------------------------- lossy link
_LOSS_PRIORITY = 0x10


def random_loss(one_in: int, min_len: int = 1000) -> list[Insn]:
    """A tc program dropping, at random, one in `one_in` (a power of two) frames of at least
    min_len bytes (data segments, never pure ACKs); every other frame passes."""
    if one_in & (one_in - 1) or one_in < 2:
        raise ValueError(f"one_in must be a power of two >= 2, got {one_in}")
    ldx_w, jlt_k, call, and_k, jne_k = 0x61, 0xA5, 0x85, 0x57, 0x55
    mov_k, exit_ = 0xB7, 0x95
    get_prandom_u32 = 7
    return [
        Insn(ldx_w, dst=2, src=1, off=0),           # r2 = skb->len
        Insn(jlt_k, dst=2, off=5, imm=min_len),     # short frame -> pass
        Insn(call, imm=get_prandom_u32),
        Insn(and_k, dst=0, imm=one_in - 1),
        Insn(jne_k, dst=0, off=2, imm=0),           # not this one -> pass
        Insn(mov_k, dst=0, imm=labfilter.TC_ACT_SHOT),
        Insn(exit_),
        Insn(mov_k, dst=0, imm=labfilter.TC_ACT_OK),  # pass
        Insn(exit_),
    ]


class LossyLink:
    """While open, the gateway port towards a host drops random data segments on their way to
    it (outside the host: its TCP stack sees plain loss)."""

    def __init__(self, gw_netns: str, port: str, one_in: int) -> None:
        self.target = TcTarget(port, Direction.EGRESS, _LOSS_PRIORITY, gw_netns)
        self.one_in = one_in
        self._hook: TcHook | None = None

    def __enter__(self) -> LossyLink:
        fd = labfilter.load(random_loss(self.one_in), name="tcpcp_lossy")
        try:
            self._hook = TcHook(self.target, fd, "tcpcp_lossy")
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.detach()
            self._hook = None


# ---------------------------------------------------------------------- uploads by guard mode
class Guarding(enum.Enum):
    """How an upload's connection is gated."""

    UNGATED = "ungated"  # no gate attached: the namespace's defaults (SACK on)
    FROM_SYN_ACK = "from-syn-ack"  # guarded port: no SACK negotiated
    MID_CONNECTION = "mid-connection"  # guarded after accept: SACK negotiated, blocks stripped


@dataclass(frozen=True, slots=True)
class PeerCounters:
    """The peer's (sender's) TCP counters, or their change over a run."""

    timeouts: int
    reno_recoveries: int
    sack_recoveries: int
    retrans_segs: int

    def __sub__(self, before: PeerCounters) -> PeerCounters:
        return PeerCounters(self.timeouts - before.timeouts,
                            self.reno_recoveries - before.reno_recoveries,
                            self.sack_recoveries - before.sack_recoveries,
                            self.retrans_segs - before.retrans_segs)


_PEER_COUNTERS = ("TcpExtTCPTimeouts", "TcpExtTCPRenoRecovery", "TcpExtTCPSackRecovery",
                  "TcpRetransSegs")


def peer_counters(lab_run: object) -> PeerCounters:
    return PeerCounters(*(nstat(lab_run, "peer", c) for c in _PEER_COUNTERS))


def guard_then_read(srv: socket.socket, gate: Gate, policy: CommitPolicy,
                    out: Received) -> Received:
    """Accept, guard the established connection from its current rcv_nxt, tell the peer to go
    (one byte) and read it to the end, committing by policy."""
    srv.settimeout(60)
    conn, _ = srv.accept()
    assert repair.dump(conn).params.options & TcpOption.SACK, \
        "expected SACK negotiated on an unguarded port"
    base = gate.guard(conn)
    conn.sendall(b"g")
    return read_gated(conn, base, gate, policy, out)


def upload(lab: Lab, port: int, size: int, guarding: Guarding,
           policy: CommitPolicy | None = None,
           backend: Backend | str | None = Backend.BPF) -> Received:
    """One upload of size bytes from the peer to the origin, checked intact end to end, gated
    by backend (None: the one open_gate picks on this kernel)."""
    policy = policy or CommitPolicy()
    with contextlib.ExitStack() as stack:
        gate = None
        if guarding is not Guarding.UNGATED:
            gate = stack.enter_context(open_gate("eth0", backend=backend,
                                                 netns=lab.netns("origin")))
        srv = lab.call("origin", listener, 4, port)
        stack.callback(srv.close)
        if guarding is Guarding.FROM_SYN_ACK:
            assert gate is not None
            gate.guard_listen(srv)
        out = Received()
        if guarding is Guarding.MID_CONNECTION:
            fut = lab.submit("origin", guard_then_read, srv, gate, policy, out)
        else:
            fut = lab.submit("origin", receive_gated, srv, gate, policy, out, 120.0)
        client = lab.run("peer", uploader_argv(lab.service(4), port, size,
                                               wait_for_go=guarding is Guarding.MID_CONNECTION),
                         capture_output=True, text=True, timeout=180)
        got = fut.result(timeout=180)
    assert client.returncode == 0, client.stderr
    assert (got.nbytes, got.sha256) == (size, expected_sha256(size))
    assert client.stdout.strip() == got.sha256
    return got
