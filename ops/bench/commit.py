"""Checkpointer commits: commit -> ACK on the wire p50/p99, commits/s, and the idle agent's CPU.

In the lab: a RedisServer in host store, the real `checkpointer` daemon (ops/agentlab.py, eBPF
gate, the daemon's default 1 s checkpoint period and 3 s lease) in origin, an application in
this process whose sockets live in origin and which commits through one shared
checkpointer.client Checkpointer, peers in host peer (a separate process). Phases, in order:

  baseline   from origin's namespace, redis-py: SET round trips one at a time (p50/p99) and
             pipelined SETs (--pipeline per round trip) per second, the same size as a commit's
             state;
  latency    1, then 100 connections: each peer sends --messages small messages (--interval-ms
             apart, random phase, TCP_NODELAY); the application reads and commits each read.
             A capture on the gateway (outside origin) finds the ACK whose ack is the
             connection's SYN-ACK ack + consumed; its capture time minus time.time() just
             before the commit call is the commit -> ACK latency (the same host clock). The
             commit call's own return latency is reported beside it;
  rate       100 connections, one thread each, committing a fresh state blob in a loop for
             --duration-s (after --warmup-s), durability none; the agent's CPU per commit and
             the agent's and the application's CPU while committing;
  idle       --idle-connections (10,000) guarded idle connections, the agent's CPU (utime +
             stime of /proc/<pid>/stat, as a fraction of one core) over --idle-window-s right
             after registering them, the periodic checkpoints written in the window counted
             from its metrics. The agent checkpoints an idle connection again every 30 s, so
             whether and how many of those refreshes fall in that window depends on how long
             the registrations took; --idle-cycle (default) measures a further window of one
             whole refresh cycle (30 s: every connection refreshed about once), the steady
             state;
  wait1      a replica in store2, the pipelined SET + WAIT 1 baseline, the agent restarted with
             --durability wait:1, and the rate phase again.

Targets of the issue, printed as pass/fail (a miss is reported, not an error): commit p99
<= 2 ms with local Redis and no WAIT; >= 20,000 commits/s without WAIT; 10,000 idle connections
under 30% of one core. --quick shrinks every count and duration (a plumbing check, not figures).

Writes --output (bench/commit.json): commit_p50_us, commit_p99_us, commit_return_p50_us,
commit_return_p99_us (each keyed by connection count "1", "100"), latency_samples, commits_made
(same keys), commits_per_s, agent_cpu_per_commit_us, agent_cpu_while_committing and
app_cpu_while_committing (keyed "none", "wait1"), agent_cpu_idle_10k (null unless measured with
10,000 connections), agent_cpu_idle (connections, window_s, cpu, periodic_checkpoints,
registration_s, cycle: null or window_s, cpu, periodic_checkpoints), agent_max_open_files,
baseline, ratios, targets, settings, loadavg_1m.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from checkpointer.agent import REFRESH_S
from checkpointer.client import Checkpointer, Guarded
from ops.agentlab import AgentProcess, write_keys
from ops.apps.demo_server import raise_fd_limit
from ops.capture import ACK, MASK, SYN, Capture
from ops.lab import Lab
from ops.redislab import RedisServer

log = structlog.get_logger(component="tcpcp.bench.commit")

REDIS_PORT = 6379
METRICS_PORT = 9464
PORT_LAT1, PORT_LAT100, PORT_RATE, PORT_IDLE, PORT_RATE_WAIT = 7101, 7102, 7103, 7104, 7105
PORTS = (PORT_LAT1, PORT_LAT100, PORT_RATE, PORT_IDLE, PORT_RATE_WAIT)
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_P99_US = 2000.0
TARGET_COMMITS_PER_S = 20_000.0
TARGET_IDLE_CPU = 0.30
TARGET_IDLE_CONNECTIONS = 10_000
REGISTRATION_CLIENTS = 4
LABEL = 50
"""Width of the printed figures' label column."""
DAEMON_PERIOD_MS = 1000
DAEMON_LEASE_TTL_MS = 3000
"""The daemon's defaults (checkpointer/config.py), which AgentProcess overrides for tests."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small counts and short durations (checks the plumbing; the "
                        "figures mean little)")
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per connection in the latency runs (default 1000 for "
                        "1 connection and 100 each for 100; --quick 100 and 10)")
    parser.add_argument("--message-bytes", type=int, default=64)
    parser.add_argument("--interval-ms", type=float, default=None,
                        help="gap between one connection's messages (default 2 ms for 1 "
                        "connection, 100 ms each for 100: 1,000 commits/s offered)")
    parser.add_argument("--state-bytes", type=int, default=64,
                        help="size of the state blob of each commit")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="commit-rate window (default 5; --quick 1)")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="commits before the rate window opens (default 1; --quick 0.5)")
    parser.add_argument("--idle-connections", type=int, default=None,
                        help="guarded idle connections (default 10000; --quick 200)")
    parser.add_argument("--idle-window-s", type=float, default=None,
                        help="CPU window over the idle agent (default 10; --quick 2)")
    parser.add_argument("--idle-cycle", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the idle agent over one whole 30 s refresh cycle "
                        "(default on; --quick off)")
    parser.add_argument("--pipeline", type=int, default=100,
                        help="SETs per round trip of the pipelined baseline")
    parser.add_argument("--output", type=Path, default=Path("bench/commit.json"))


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    messages_1: int
    messages_100: int
    message_bytes: int
    interval_1_s: float
    interval_100_s: float
    state_bytes: int
    duration_s: float
    warmup_s: float
    idle_connections: int
    idle_window_s: float
    idle_cycle: bool
    pipeline: int
    set_round_trips: int
    pipelined_s: float

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        q = bool(args.quick)

        def pick(value: Any, full: Any, quick: Any) -> Any:
            return value if value is not None else (quick if q else full)
        interval = None if args.interval_ms is None else args.interval_ms / 1000
        return cls(quick=q, messages_1=pick(args.messages, 1000, 100),
                   messages_100=pick(args.messages, 100, 10),
                   message_bytes=args.message_bytes,
                   interval_1_s=pick(interval, 0.002, 0.002),
                   interval_100_s=pick(interval, 0.100, 0.100),
                   state_bytes=args.state_bytes, duration_s=pick(args.duration_s, 5.0, 1.0),
                   warmup_s=pick(args.warmup_s, 1.0, 0.5),
                   idle_connections=pick(args.idle_connections, TARGET_IDLE_CONNECTIONS, 200),
                   idle_window_s=pick(args.idle_window_s, 10.0, 2.0),
                   idle_cycle=pick(args.idle_cycle, True, False),
                   pipeline=args.pipeline, set_round_trips=300 if q else 3000,
                   pipelined_s=0.5 if q else 2.0)


# ------------------------------------------------------------------ the peers

_PEERS = r"""
import random, socket, struct, sys, threading, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count, interval, size = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
print("ready", flush=True)
def send(s):
    msg = b"m" * size
    start = time.monotonic() + random.uniform(0, interval)
    for i in range(count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s.sendall(msg)
if count:
    sys.stdin.readline()  # go
    threads = [threading.Thread(target=send, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("sent", flush=True)
sys.stdin.readline()  # reset
for s in socks:  # reset, not FIN: nothing is left for the gate to hold or the peer to retry
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("closed", flush=True)
"""


class Peers:
    """n connections to the service from one process in host peer (its own descriptor limit:
    both ends of 10,000 connections would not fit in one process), each sending `count`
    messages of `size` bytes `interval` seconds apart once told to go (with count 0 they stay
    idle), reset when told."""

    def __init__(self, lab: Lab, port: int, n: int, count: int = 0, interval: float = 0.0,
                 size: int = 0) -> None:
        self.proc = lab.popen("peer", [sys.executable, "-c", _PEERS, lab.service(4), str(port),
                                       str(n), str(count), str(interval), str(size)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def _step(self, command: str, expect: str) -> None:
        if command:
            self.stdin.write(command + "\n")
            self.stdin.flush()
        got = self.stdout.readline().strip()
        if got != expect:
            raise RuntimeError(f"expected the peers to say {expect!r}, got {got!r} "
                               f"(exit {self.proc.poll()})")

    def ready(self) -> None:
        self._step("", "ready")

    def go(self) -> None:
        self.stdin.write("go\n")
        self.stdin.flush()

    def sent(self) -> None:
        self._step("", "sent")

    def reset(self) -> None:
        self._step("reset", "closed")
        self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _listener(lab: Lab, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((lab.service(4), port))
        s.listen(4096)
        return s
    return lab.call("origin", make)


@contextlib.contextmanager
def _connections(lab: Lab, port: int, n: int, clients: Sequence[Checkpointer], *,
                 count: int = 0, interval: float = 0.0, size: int = 0,
                 guard_listener: bool = False) -> Iterator[tuple[Peers, list[socket.socket]]]:
    """n accepted connections (their sockets in origin) and their peers, guarded through
    `clients` (already connected; with guard_listener the listener is guarded by the first).
    On exit the clients close first (the agent lets go of the connections without touching
    the store), then the peers reset the connections and the application's sockets close."""
    socks: list[socket.socket] = []
    peers: Peers | None = None
    try:
        lst = _listener(lab, port)
        try:
            if guard_listener:
                clients[0].guard_listener(lst)
            peers = Peers(lab, port, n, count, interval, size)
            lst.settimeout(60)
            for _ in range(n):
                socks.append(lst.accept()[0])
        finally:
            lst.close()
        peers.ready()
        yield peers, socks
        for cp in clients:
            cp.close()
        peers.reset()
    finally:
        for cp in clients:
            cp.close()
        if peers is not None:
            peers.kill()
        for s in socks:
            s.close()


# ------------------------------------------------------------------ figures

def _pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _cpu_s(pid: int) -> float:
    """The process's utime + stime so far, in seconds (every thread counted)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pid(agent: AgentProcess) -> int:
    assert agent.proc is not None
    pid = agent.proc.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    if not any(arg.endswith(b"checkpointer") for arg in argv[:2]):
        raise RuntimeError(f"expected pid {pid} to be the checkpointer daemon, got {argv[:3]}")
    return pid


def _max_open_files(pid: int) -> int:
    """The process's soft RLIMIT_NOFILE (one descriptor per guarded connection)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise RuntimeError(f"no 'Max open files' in /proc/{pid}/limits")


def _metric(agent: AgentProcess, name: str) -> float:
    return agent.metrics().get(f"tcpcp_checkpointer_{name}", 0.0)


# ------------------------------------------------------------------ baseline

def _baseline_set(srv: RedisServer, rounds: int, size: int) -> tuple[float, float]:
    """SET round trips one at a time from this thread's namespace: (p50, p99) in µs."""
    c = srv.client()
    try:
        value = b"v" * size
        for i in range(50):
            c.set(f"bench:rtt:{i}", value)
        samples = []
        for i in range(rounds):
            t0 = time.perf_counter()
            c.set(f"bench:rtt:{i % 1000}", value)
            samples.append((time.perf_counter() - t0) * 1e6)
    finally:
        c.close()
    return _pct(samples, 50), _pct(samples, 99)


def _baseline_pipelined(srv: RedisServer, depth: int, seconds: float, size: int,
                        wait: int = 0) -> float:
    """Pipelined SETs per second, `depth` per round trip (and one WAIT `wait` per round trip
    when asked)."""
    c = srv.client()
    try:
        value = b"v" * size
        done, deadline = 0, time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < deadline:
            pipe = c.pipeline(transaction=False)
            for i in range(depth):
                pipe.set(f"bench:pipe:{i}", value)
            if wait:
                pipe.execute_command("WAIT", wait, 1000)
            got = pipe.execute()
            if wait and int(got[-1]) < wait:
                raise RuntimeError(f"expected WAIT {wait} to count {wait} replicas, got {got[-1]}")
            done += depth
        return done / (time.perf_counter() - t0)
    finally:
        c.close()


# ------------------------------------------------------------------ latency

@dataclass
class CommitLog:
    """What the application saw of each commit: (peer port, consumed, wall time before the
    call, seconds the call took)."""

    commits: list[tuple[int, int, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[BaseException] = field(default_factory=list)


def _read_and_commit(cp: Checkpointer, conn: socket.socket, total: int, out: CommitLog,
                     registered: threading.Barrier) -> None:
    try:
        g = cp.guard(conn, state=b"0")
        port = conn.getpeername()[1]
        registered.wait(60)
        conn.settimeout(60)
        consumed = 0
        mine = []
        while consumed < total:
            data = conn.recv(65536)
            if not data:
                raise RuntimeError(f"the peer closed after {consumed} of {total} bytes")
            consumed += len(data)
            state = b"%d" % consumed
            wall, t0 = time.time(), time.perf_counter()
            g.commit(state, consumed=consumed)
            mine.append((port, consumed, wall, time.perf_counter() - t0))
        with out.lock:
            out.commits.extend(mine)
    except BaseException as exc:
        out.errors.append(exc)
        with contextlib.suppress(threading.BrokenBarrierError):
            registered.abort()


def _latency(lab: Lab, agent: AgentProcess, port: int, n: int, messages: int,
             interval: float, size: int) -> dict[str, Any]:
    """n connections each committing `messages` reads: commit -> ACK and commit-return µs."""
    cap = Capture.in_lab(lab, "gw", "p-origin", f"tcp src port {port}", snaplen=200).start()
    out = CommitLog()
    total = messages * size
    try:
        cp = Checkpointer(agent.socket_path, name=f"bench-latency-{n}").connect()
        with _connections(lab, port, n, [cp], count=messages, interval=interval, size=size,
                          guard_listener=True) as (peers, socks):
            registered = threading.Barrier(n + 1)
            threads = [threading.Thread(target=_read_and_commit,
                                        args=(cp, s, total, out, registered)) for s in socks]
            for t in threads:
                t.start()
            with contextlib.suppress(threading.BrokenBarrierError):
                registered.wait(120)
                peers.go()
            for t in threads:
                t.join(messages * interval + 120)
            if out.errors or registered.broken:
                first = out.errors[0] if out.errors else None
                raise RuntimeError(f"{len(out.errors)} of {n} connections failed, first: "
                                   f"{first!r}") from first
            peers.sent()
    finally:
        cap.stop()
    segs = cap.segments()
    base = {s.dport: s.ack for s in segs if s.flags & SYN}
    first_ack: dict[tuple[int, int], float] = {}
    for s in segs:
        if s.flags & ACK and not s.flags & SYN:
            first_ack.setdefault((s.dport, s.ack), s.at)
    to_ack, returns = [], []
    for peer_port, consumed, wall, took in out.commits:
        returns.append(took * 1e6)
        if peer_port not in base:
            continue
        at = first_ack.get((peer_port, (base[peer_port] + consumed) & MASK))
        if at is not None:
            to_ack.append(max(0.0, at - wall) * 1e6)
    if not to_ack:
        raise RuntimeError(f"no commit of {len(out.commits)} matched an ACK on the wire")
    return {"p50": _pct(to_ack, 50), "p99": _pct(to_ack, 99), "return_p50": _pct(returns, 50),
            "return_p99": _pct(returns, 99), "samples": len(to_ack),
            "commits": len(out.commits)}


# ------------------------------------------------------------------ commit rate

def _guard_all(cps: Sequence[Checkpointer], socks: Sequence[socket.socket]) -> list[Guarded]:
    """Register every socket, spread over the clients (one agent thread each)."""
    guarded: list[list[Guarded]] = [[] for _ in cps]
    errors: list[BaseException] = []

    def register(i: int) -> None:
        try:
            for s in socks[i::len(cps)]:
                guarded[i].append(cps[i].guard(s, state=b"0"))
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(cps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"registering {len(socks)} connections failed: {errors[0]!r}") \
            from errors[0]
    return [g for part in guarded for g in part]


def _commit_rate(lab: Lab, agent: AgentProcess, port: int, s: Settings,
                 label: str) -> dict[str, float]:
    """100 connections committing fresh state blobs as fast as they can through one client."""
    n, pid = 100, _pid(agent)
    cp = Checkpointer(agent.socket_path, name=f"bench-rate-{label}").connect()
    with _connections(lab, port, n, [cp]) as (_, socks):
        guarded = [cp.guard(sock, state=b"0") for sock in socks]
        stop = threading.Event()
        counts = [0] * n
        errors: list[BaseException] = []
        pad = b"s" * max(0, s.state_bytes - 8)

        def loop(k: int, g: Guarded) -> None:
            try:
                i = 0
                while not stop.is_set():
                    g.commit(struct.pack("!Q", i) + pad, consumed=g.consumed)
                    i += 1
                    counts[k] = i
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=loop, args=(k, g)) for k, g in enumerate(guarded)]
        for t in threads:
            t.start()
        time.sleep(s.warmup_s)
        c0, cpu0, t0 = sum(counts), _cpu_s(pid), time.perf_counter()
        app0 = _cpu_s(os.getpid())
        time.sleep(s.duration_s)
        c1, cpu1, t1 = sum(counts), _cpu_s(pid), time.perf_counter()
        app1 = _cpu_s(os.getpid())
        stop.set()
        for t in threads:
            t.join(30)
        if errors:
            raise RuntimeError(f"{len(errors)} committing threads failed, first: "
                               f"{errors[0]!r}") from errors[0]
    commits = c1 - c0
    return {"per_s": commits / (t1 - t0), "commits": commits,
            "agent_cpu_per_commit_us": (cpu1 - cpu0) / max(1, commits) * 1e6,
            "agent_cpu": (cpu1 - cpu0) / (t1 - t0), "app_cpu": (app1 - app0) / (t1 - t0)}


# ------------------------------------------------------------------ idle

def _window(agent: AgentProcess, pid: int, seconds: float) -> dict[str, float]:
    """The agent's CPU as a fraction of one core, and the periodic checkpoints it wrote, over a
    window of `seconds`."""
    checkpoints0 = _metric(agent, "checkpoints_total")
    cpu0, t0 = _cpu_s(pid), time.perf_counter()
    time.sleep(seconds)
    cpu1, t1 = _cpu_s(pid), time.perf_counter()
    checkpoints1 = _metric(agent, "checkpoints_total")
    return {"window_s": round(t1 - t0, 2), "cpu": round((cpu1 - cpu0) / (t1 - t0), 4),
            "periodic_checkpoints": int(checkpoints1 - checkpoints0)}


def _idle(lab: Lab, agent: AgentProcess, port: int, s: Settings) -> dict[str, Any]:
    """The agent's CPU with s.idle_connections guarded idle connections: over s.idle_window_s
    right after they are registered and, with s.idle_cycle, over one whole refresh cycle."""
    n, pid = s.idle_connections, _pid(agent)
    # the clients connect before the connections are accepted: the client's reply reader
    # select()s on its socket, which fails on a descriptor number of 1024 or more
    cps = [Checkpointer(agent.socket_path, name=f"bench-idle-{i}").connect()
           for i in range(REGISTRATION_CLIENTS)]
    with _connections(lab, port, n, cps) as (_, socks):
        t0 = time.perf_counter()
        _guard_all(cps, socks)
        registration_s = time.perf_counter() - t0
        log.info("idle_registered", connections=n, seconds=round(registration_s, 1))
        time.sleep(1.0)  # the last registrations' store writes settle
        window = _window(agent, pid, s.idle_window_s)
        log.info("idle_window", connections=n, **window)
        cycle = None
        if s.idle_cycle:
            cycle = _window(agent, pid, REFRESH_S)
            log.info("idle_cycle", connections=n, **cycle)
        guarded = _metric(agent, "guarded_connections")
    if guarded != n:
        raise RuntimeError(f"expected the agent to guard {n} connections, it said {guarded}")
    return {"connections": n, **window, "registration_s": round(registration_s, 2),
            "cycle": cycle}


# ------------------------------------------------------------------ the run

def _phase(name: str, fn: Callable[[], Any], **context: Any) -> Any:
    log.info("phase_started", phase=name, **context)
    t0 = time.perf_counter()
    result = fn()
    log.info("phase_done", phase=name, seconds=round(time.perf_counter() - t0, 1))
    return result


def run(args: argparse.Namespace) -> int:
    s = Settings.of(args)
    raise_fd_limit()  # the application's and the peers' sockets; the agent inherits it too
    workdir = Path(tempfile.mkdtemp(prefix="tcpcp-bench-commit-"))
    loadavg = os.getloadavg()[0]
    results: dict[str, Any] = {"settings": {
        "quick": s.quick, "messages": {"1": s.messages_1, "100": s.messages_100},
        "message_bytes": s.message_bytes,
        "interval_ms": {"1": s.interval_1_s * 1000, "100": s.interval_100_s * 1000},
        "offered_messages_per_s": {"1": round(1 / s.interval_1_s),
                                   "100": round(100 / s.interval_100_s)},
        "state_bytes": s.state_bytes, "duration_s": s.duration_s, "pipeline": s.pipeline,
        "idle_window_s": s.idle_window_s, "checkpoint_period_ms": DAEMON_PERIOD_MS,
        "lease_ttl_ms": DAEMON_LEASE_TTL_MS, "gate_backend": "bpf"},
        "loadavg_1m": round(loadavg, 2)}
    try:
        with Lab(stores=2) as lab:
            results.update(_measure(lab, s, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _report(results, s, args.output)
    return 0


def _measure(lab: Lab, s: Settings, workdir: Path) -> dict[str, Any]:
    primary = RedisServer(lab, "store", REDIS_PORT).start()
    replica: RedisServer | None = None
    agent = AgentProcess(lab, "origin", store_url=primary.url, keys=write_keys(
        workdir / "keys.json"), guard=PORTS, workdir=workdir, backend="bpf",
        ttl_ms=DAEMON_LEASE_TTL_MS, period_ms=DAEMON_PERIOD_MS, metrics_port=METRICS_PORT)
    try:
        rtt, pipelined = _phase("baseline", lambda: (
            lab.call("origin", _baseline_set, primary, s.set_round_trips, s.state_bytes),
            lab.call("origin", _baseline_pipelined, primary, s.pipeline, s.pipelined_s,
                     s.state_bytes)))
        log.info("baseline", set_p50_us=round(rtt[0], 1), set_p99_us=round(rtt[1], 1),
                 pipelined_set_per_s=round(pipelined))
        _phase("agent_start", agent.start, durability="none")
        nofile = _max_open_files(_pid(agent))
        lat1 = _phase("latency", lambda: _latency(lab, agent, PORT_LAT1, 1, s.messages_1,
                                                  s.interval_1_s, s.message_bytes),
                      connections=1, messages=s.messages_1)
        log.info("latency", connections=1, p50_us=round(lat1["p50"], 1),
                 p99_us=round(lat1["p99"], 1), samples=lat1["samples"])
        lat100 = _phase("latency", lambda: _latency(lab, agent, PORT_LAT100, 100,
                                                    s.messages_100, s.interval_100_s,
                                                    s.message_bytes),
                        connections=100, messages=s.messages_100)
        log.info("latency", connections=100, p50_us=round(lat100["p50"], 1),
                 p99_us=round(lat100["p99"], 1), samples=lat100["samples"])
        rate = _phase("commit_rate", lambda: _commit_rate(lab, agent, PORT_RATE, s, "none"),
                      durability="none", seconds=s.duration_s)
        log.info("commit_rate", durability="none", per_s=round(rate["per_s"]))
        idle = _phase("idle", lambda: _idle(lab, agent, PORT_IDLE, s),
                      connections=s.idle_connections, window_s=s.idle_window_s)
        replica = RedisServer(lab, "store2", REDIS_PORT, replicaof=primary).start()
        pipelined_wait = lab.call("origin", _baseline_pipelined, primary, s.pipeline,
                                  s.pipelined_s, s.state_bytes, 1)
        log.info("baseline", pipelined_set_wait1_per_s=round(pipelined_wait))
        if agent.stop() != 0:
            raise RuntimeError(f"the agent did not stop cleanly: {agent.log_tail()}")
        agent.argv = [*agent.argv, "--durability", "wait:1"]
        _phase("agent_restart", agent.start, durability="wait:1")
        rate_wait = _phase("commit_rate", lambda: _commit_rate(lab, agent, PORT_RATE_WAIT, s,
                                                               "wait1"),
                           durability="wait:1", seconds=s.duration_s)
        log.info("commit_rate", durability="wait:1", per_s=round(rate_wait["per_s"]))
    except BaseException:
        log.error("bench_failed", agent_log=agent.log_tail(15))
        raise
    finally:
        agent.close()
        if replica is not None:
            replica.stop()
        primary.stop()
    lat = {"1": lat1, "100": lat100}
    rates = {"none": rate, "wait1": rate_wait}
    baseline = {"store_set_p50_us": rtt[0], "store_set_p99_us": rtt[1],
                "store_pipelined_set_per_s": pipelined,
                "store_pipelined_set_wait1_per_s": pipelined_wait}
    idle_10k = idle["cpu"] if idle["connections"] == TARGET_IDLE_CONNECTIONS else None
    cycle_10k = None if idle_10k is None or idle["cycle"] is None else idle["cycle"]["cpu"]
    return {
        "commit_p50_us": {k: round(v["p50"], 1) for k, v in lat.items()},
        "commit_p99_us": {k: round(v["p99"], 1) for k, v in lat.items()},
        "commit_return_p50_us": {k: round(v["return_p50"], 1) for k, v in lat.items()},
        "commit_return_p99_us": {k: round(v["return_p99"], 1) for k, v in lat.items()},
        "latency_samples": {k: v["samples"] for k, v in lat.items()},
        "commits_made": {k: v["commits"] for k, v in lat.items()},
        "commits_per_s": {k: round(v["per_s"]) for k, v in rates.items()},
        "agent_cpu_per_commit_us": {k: round(v["agent_cpu_per_commit_us"], 1)
                                    for k, v in rates.items()},
        "agent_cpu_while_committing": {k: round(v["agent_cpu"], 3) for k, v in rates.items()},
        "app_cpu_while_committing": {k: round(v["app_cpu"], 3) for k, v in rates.items()},
        "agent_cpu_idle_10k": None if idle_10k is None else round(idle_10k, 4),
        "agent_cpu_idle": idle,
        "agent_max_open_files": nofile,
        "baseline": {k: round(v, 1) for k, v in baseline.items()},
        "ratios": {
            "commit_p50_vs_set_p50": {k: round(v["p50"] / rtt[0], 2) for k, v in lat.items()},
            "commit_p99_vs_set_p99": {k: round(v["p99"] / rtt[1], 2) for k, v in lat.items()},
            "commits_per_s_vs_pipelined_set": {
                "none": round(rate["per_s"] / pipelined, 3),
                "wait1": round(rate_wait["per_s"] / pipelined_wait, 3)}},
        "targets": {
            "commit_p99_le_2ms_1": lat1["p99"] <= TARGET_P99_US,
            "commit_p99_le_2ms_100": lat100["p99"] <= TARGET_P99_US,
            "commits_per_s_ge_20000": rate["per_s"] >= TARGET_COMMITS_PER_S,
            "idle_10k_cpu_lt_30pct": None if idle_10k is None else idle_10k < TARGET_IDLE_CPU,
            "idle_10k_cpu_lt_30pct_cycle": None if cycle_10k is None
            else cycle_10k < TARGET_IDLE_CPU},
    }


def _report(r: dict[str, Any], s: Settings, output: Path) -> None:
    b = r["baseline"]
    print(f"load average (1 min) at the start: {r['loadavg_1m']}"
          + ("   (--quick: plumbing check, not figures)" if s.quick else ""))
    print(f"{'store SET round trip (baseline)':{LABEL}} p50 {b['store_set_p50_us']:8.1f} us  "
          f"p99 {b['store_set_p99_us']:8.1f} us")
    for n in ("1", "100"):
        offered = r["settings"]["offered_messages_per_s"][n]
        conns = "1 conn" if n == "1" else f"{n} conns"
        print(f"{f'commit -> ACK on the wire, {conns} ({offered} msg/s)':{LABEL}} p50 "
              f"{r['commit_p50_us'][n]:8.1f} us  "
              f"p99 {r['commit_p99_us'][n]:8.1f} us   (x{r['ratios']['commit_p50_vs_set_p50'][n]}"
              f" / x{r['ratios']['commit_p99_vs_set_p99'][n]} the SET round trip; "
              f"{r['latency_samples'][n]} samples)")
        print(f"{f'commit call returns, {conns}':{LABEL}} p50 "
              f"{r['commit_return_p50_us'][n]:8.1f} us  p99 {r['commit_return_p99_us'][n]:8.1f} us")
    for key, label, base in (("none", "no WAIT", "store_pipelined_set_per_s"),
                             ("wait1", "WAIT 1", "store_pipelined_set_wait1_per_s")):
        print(f"{f'commits/s, 100 conns, {label}':{LABEL}} {r['commits_per_s'][key]:>10}      "
              f"(baseline pipelined SET{'+WAIT 1' if key == 'wait1' else ''} x{s.pipeline}: "
              f"{b[base]:.0f}/s, ratio {r['ratios']['commits_per_s_vs_pipelined_set'][key]}; "
              f"agent {r['agent_cpu_per_commit_us'][key]} us CPU per commit, agent "
              f"{r['agent_cpu_while_committing'][key] * 100:.0f} % + application "
              f"{r['app_cpu_while_committing'][key] * 100:.0f} % of one core)")
    idle = r["agent_cpu_idle"]
    label = f"agent CPU, {idle['connections']} idle conns"
    print(f"{label:{LABEL}} {idle['cpu'] * 100:9.1f} % of one "
          f"core over {idle['window_s']} s ({idle['periodic_checkpoints']} periodic checkpoints "
          f"in the window; registering took {idle['registration_s']} s)")
    cycle = idle["cycle"]
    if cycle is not None:
        print(f"{'  ... over one whole 30 s refresh cycle':{LABEL}} "
              f"{cycle['cpu'] * 100:9.1f} % of one core over {cycle['window_s']} s "
              f"({cycle['periodic_checkpoints']} periodic checkpoints)")
    print(f"{'agent descriptor limit (RLIMIT_NOFILE)':{LABEL}} {r['agent_max_open_files']:>10}")
    t = r["targets"]

    def verdict(ok: bool | None) -> str:
        return "not checked" if ok is None else "PASS" if ok else "FAIL"
    print(f"target commit p99 <= 2 ms, local Redis, no WAIT, 1 conn:    "
          f"{verdict(t['commit_p99_le_2ms_1'])} ({r['commit_p99_us']['1'] / 1000:.2f} ms)")
    print(f"target commit p99 <= 2 ms, local Redis, no WAIT, 100 conns: "
          f"{verdict(t['commit_p99_le_2ms_100'])} ({r['commit_p99_us']['100'] / 1000:.2f} ms)")
    print(f"target >= 20,000 commits/s without WAIT:                    "
          f"{verdict(t['commits_per_s_ge_20000'])} ({r['commits_per_s']['none']}/s)")
    idle_note = f"{idle['cpu'] * 100:.1f} %" if t["idle_10k_cpu_lt_30pct"] is not None \
        else f"measured with {idle['connections']} connections"
    if t["idle_10k_cpu_lt_30pct_cycle"] is not None:
        idle_note += (f" over {idle['window_s']} s; over one refresh cycle "
                      f"{verdict(t['idle_10k_cpu_lt_30pct_cycle'])}: {cycle['cpu'] * 100:.1f} %")
    print(f"target 10,000 idle connections under 30% of one core:       "
          f"{verdict(t['idle_10k_cpu_lt_30pct'])} ({idle_note})")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    print(f"wrote {output}")

