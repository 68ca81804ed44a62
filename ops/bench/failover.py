"""Failover: how long a crash of the origin interrupts its connections, and how fast a standby
restores many of them.

Each round builds a lab of its own (ops/lab.py, the address takeover: the resurrector adds the
service address on the standby and announces it): Redis in host store, the real `checkpointer`
(eBPF gate, --ttl-ms lease) and the HTTP file server (ops/apps/fileserver.py) in origin, the
real `resurrector` (polling the lease every --poll-ms) and an adopting file server in standby.

  timeline   --connections downloads (a Python client in host peer: one GET each, read at
             --read-kbps per connection with a 64 KiB receive buffer, so each stays mid-way);
             once every connection committed its first MiB, the origin is crashed (the lab's
             crash: cut at the gateway, then every process killed). From a capture in the peer's
             namespace and the resurrector's log, on this machine's one clock:
               crash_to_first_byte_ms       the crash -> the standby's first data segment to
                                            the peer (captured on the standby's port of the
                                            gateway's bridge, one routed hop before the peer),
                                            per connection: first, median, last;
               first_byte_after_detect_ms   the resurrector seeing the lease expired -> that
                                            first data segment;
               detect_after_crash_ms        the crash -> the expiry seen (bounded by the TTL:
                                            the last renewal was at most TTL/3 before the
                                            crash, and the lease lives TTL after it);
             and the resurrector's own timeline (claimed, quarantined, traffic_moved, probed,
             restored, handed; ms after the expiry was seen). Every download is then checked
             whole (SHA-256) and the capture for RSTs: a round that breaks a connection is
             reported as failed, its figures kept;
  restore    --restore-connections (10,000) idle guarded connections (this process registers
             them in origin, the peers are one process in host peer), the origin crashed, and
             the resurrector's timeline: restore_s = restored_ms - claimed_ms (quarantine,
             takeover, probes and the bulk restore of every connection), the rate per second,
             and handed_ms (all of them handed to an adopter in the standby).

Targets of the issue, printed as pass/fail (a miss is reported, not an error):
first_byte_after_detect_ms <= 50; restore of 10,000 connections <= 1 s; crash_to_first_byte_ms
<= TTL + 100 ms. The baseline measured beside them is the lease TTL itself, the floor of any
lease-based detection: crash_to_first_byte / TTL is printed as a ratio. --quick shrinks every
count (a plumbing check, not figures).

Writes --output (bench/failover.json): rounds (each round's figures), the medians over rounds
of crash_to_first_byte_ms (first, median and last connection), first_byte_after_detect_ms,
detect_after_crash_ms, the timeline, restore (connections, restore_s, per_s, handed_ms),
restore_10k_s (null unless measured with 10,000), targets, settings, loadavg_1m.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from checkpointer.client import Checkpointer
from ops.agentlab import AgentProcess, write_keys
from ops.apps.demo_server import raise_fd_limit
from ops.bench.commit import Peers, _guard_all
from ops.capture import Capture
from ops.failoverlab import ResurrectorProcess, events
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from resurrector.adopt import adopt
from store.client import CheckpointStore
from store.config import StoreConfig
from store.signing import load_keyring

log = structlog.get_logger(component="tcpcp.bench.failover")

REDIS_PORT = 6379
PORT_FILES, PORT_IDLE = 7201, 7202
RST = 0x04
TARGET_FIRST_BYTE_AFTER_DETECT_MS = 50.0
TARGET_RESTORE_10K_S = 1.0
TARGET_OVER_TTL_MS = 100.0
TARGET_RESTORE_CONNECTIONS = 10_000
FILE_BYTES = 4 << 20  # each download: about 20 s at the default read rate
LABEL = 46

_DOWNLOADS = r"""
import hashlib, socket, sys, threading, time
host, port, n, kbps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
out, lock = [], threading.Lock()
def one(i):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.settimeout(120)
        s.connect((host, port))
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise EOFError("closed in the response head")
            head += chunk
        head, _, body = head.partition(b"\r\n\r\n")
        length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length")][0])
        digest, got = hashlib.sha256(body), len(body)
        step, period = 8192, 8192 / (kbps * 1000)
        t0 = time.monotonic()
        while got < length:
            chunk = s.recv(min(step, length - got))
            if not chunk:
                raise EOFError(f"closed after {got} of {length} bytes")
            digest.update(chunk)
            got += len(chunk)
            delay = t0 + (got / step) * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        line = f"ok {digest.hexdigest()}"
    except Exception as exc:
        line = f"error {type(exc).__name__}: {exc}"
    with lock:
        out.append(line)
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print("\n".join(out), flush=True)
"""


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    rounds: int
    connections: int
    restore_connections: int
    read_kbps: float
    ttl_ms: int
    poll_ms: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        def pick(value: Any, full: Any, quick: Any) -> Any:
            return value if value is not None else (quick if args.quick else full)
        return cls(quick=args.quick, rounds=pick(args.rounds, 3, 1),
                   connections=pick(args.connections, 100, 10),
                   restore_connections=pick(args.restore_connections,
                                            TARGET_RESTORE_CONNECTIONS, 200),
                   read_kbps=args.read_kbps, ttl_ms=args.ttl_ms, poll_ms=args.poll_ms)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="1 round of 10 downloads, 200 restored connections: a plumbing "
                        "check, not figures")
    parser.add_argument("--rounds", type=int, default=None,
                        help="crashes timed, each in a fresh lab (default 3)")
    parser.add_argument("--connections", type=int, default=None,
                        help="downloads under way at each timed crash (default 100)")
    parser.add_argument("--restore-connections", type=int, default=None,
                        help="idle connections crashed and restored at once (default 10000)")
    parser.add_argument("--read-kbps", type=float, default=200.0,
                        help="how fast each download is read, KB/s (default 200)")
    parser.add_argument("--ttl-ms", type=int, default=1000,
                        help="the checkpointer's lease TTL (default 1000)")
    parser.add_argument("--poll-ms", type=int, default=20,
                        help="how often the resurrector reads the lease (default 20)")
    parser.add_argument("--output", type=Path, default=Path("bench/failover.json"),
                        help="where the figures go (default bench/failover.json)")


# ------------------------------------------------------------------ one lab, both sides

class Sides:
    """The origin's agent and file server, the standby's resurrector and adopter, in a lab."""

    def __init__(self, lab: Lab, workdir: Path, s: Settings, origin: str, port: int,
                 adopter: str) -> None:
        self.lab, self.workdir, self.origin, self.port = lab, workdir, origin, port
        self.redis = RedisServer(lab, "store", REDIS_PORT).start()
        self.keys = write_keys(workdir / "keys.json")
        self.agent = AgentProcess(lab, "origin", store_url=self.redis.url, keys=self.keys,
                                  guard=[port], workdir=workdir, origin=origin,
                                  ttl_ms=s.ttl_ms, backend="bpf")
        self.handover = self.agent.socket_path.parent / "handover.sock"
        self.resurrector_log = workdir / "resurrector.log"
        self.s, self.adopter = s, adopter

    def start(self) -> Sides:
        lab = self.lab
        lab.move_address("origin")
        self.agent.start()
        ResurrectorProcess(lab, "standby", store_url=self.redis.url, keys=self.keys,
                           origin=self.origin, log=self.resurrector_log,
                           serve=[lab.service(4)], linger_s=600, extra=[
                               "--handover-socket", str(self.handover),
                               "--poll-ms", str(self.s.poll_ms)]).start()
        return self

    def store(self) -> CheckpointStore:
        return self.lab.call("peer", CheckpointStore.connect, StoreConfig(url=self.redis.url),
                             load_keyring(self.keys))

    def timeline(self, timeout_s: float) -> dict[str, Any]:
        found = wait_until(lambda: events(self.resurrector_log, "failover_timeline"),
                           timeout_s, what="the resurrector's failover timeline")
        return found[0]

    def close(self) -> None:
        self.agent.close()


def _wall(iso: str) -> float:
    """A structlog ISO timestamp (UTC) as time.time()."""
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------ timeline

def _timeline_round(lab: Lab, workdir: Path, s: Settings, number: int) -> dict[str, Any]:
    root = workdir / "root"
    root.mkdir()
    content = os.urandom(FILE_BYTES)
    (root / "big.bin").write_bytes(content)
    expected = hashlib.sha256(content).hexdigest()
    sides = Sides(lab, workdir, s, f"bench-fo-{number}", PORT_FILES, "fileserver").start()
    env = dict(os.environ, TCPCP_LOG_FORMAT="json")
    cap = None
    try:
        with (workdir / "standby-files.log").open("wb") as out:
            lab.popen("standby", [sys.executable, "-m", "ops.apps.fileserver", "--root",
                                  str(root), "--adopt", str(sides.handover)],
                      stdout=out, stderr=subprocess.STDOUT, env=env)
        files_log = workdir / "files.log"
        with files_log.open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.fileserver", "--listen",
                                 f"0.0.0.0:{PORT_FILES}", "--root", str(root),
                                 "--checkpointer", str(sides.agent.socket_path)],
                      stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: events(files_log, "listening"), 60, what="the file server")
        store = sides.store()
        clients = lab.popen("peer", [sys.executable, "-c", _DOWNLOADS, lab.service(4),
                                     str(PORT_FILES), str(s.connections), str(s.read_kbps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def under_way() -> bool:
            cps = [r.checkpoint for r in lab.call("peer", lambda: list(store.records(
                sides.origin))) if r.checkpoint is not None]
            return len(cps) == s.connections and all(
                cp.outbound_produced > 1 << 20 for cp in cps)
        wait_until(under_way, 120, what=f"{s.connections} downloads past their first MiB")
        lab.call("peer", store.close)
        # on the standby's port of the gateway's bridge: whatever is seen there after the crash
        # is the standby's (a segment the origin sent just before the cut may still reach the
        # peer afterwards); the peer is one routed hop further
        cap = Capture.in_lab(lab, "gw", lab.host("standby").gw_port or "",
                             f"tcp and src port {PORT_FILES}", snaplen=80,
                             path=workdir / "standby.pcap").start()
        resets = Capture.in_lab(lab, "peer", "eth0", f"tcp port {PORT_FILES} and "
                                "tcp[tcpflags] & tcp-rst != 0",
                                path=workdir / "peer-rst.pcap").start()
        crashed_at = time.time()
        lab.crash("origin")
        timeline = sides.timeline(60)
        out_text, err = clients.communicate(timeout=600)
    finally:
        if cap is not None:
            cap.stop()
            resets.stop()
        sides.close()
    segments = cap.segments()
    lines = out_text.split("\n") if out_text else []
    whole = sum(line == f"ok {expected}" for line in lines)
    first: dict[int, float] = {}
    for seg in segments:
        if seg.at > crashed_at and seg.payload_len > 1 and seg.dport not in first:
            first[seg.dport] = seg.at
    detected_at = _wall(events(sides.resurrector_log, "lease_expired_seen")[0]["timestamp"])
    per_conn = sorted((t - crashed_at) * 1000 for t in first.values())
    result = {
        "connections": s.connections, "whole": whole,
        "errors": [line for line in lines if not line.startswith("ok ")][:5] + (
            [err.strip()[-500:]] if clients.returncode else []),
        "resets": len(resets.segments()),
        "resumed": len(first),
        "crash_to_first_byte_ms": {
            "first": round(per_conn[0], 1) if per_conn else None,
            "median": round(statistics.median(per_conn), 1) if per_conn else None,
            "last": round(per_conn[-1], 1) if per_conn else None},
        "detect_after_crash_ms": round((detected_at - crashed_at) * 1000, 1),
        "first_byte_after_detect_ms": round(per_conn[0] - (detected_at - crashed_at) * 1000, 1)
        if per_conn else None,
        "timeline_ms": {k[:-3]: v for k, v in timeline.items() if k.endswith("_ms")},
    }
    result["ok"] = (whole == s.connections and result["resets"] == 0
                    and len(first) == s.connections)
    log.info("timeline_round", round=number, **{k: v for k, v in result.items()
                                                 if k != "errors"})
    return result


# ------------------------------------------------------------------ restore

def _restore(lab: Lab, workdir: Path, s: Settings) -> dict[str, Any]:
    n = s.restore_connections
    sides = Sides(lab, workdir, s, "bench-fo-restore", PORT_IDLE, "in-process").start()
    adopted: list[socket.socket] = []
    adopted_all = threading.Event()
    failed: list[BaseException] = []

    def adopter() -> None:
        try:
            for a in adopt(sides.handover):
                adopted.append(a.sock)
                if len(adopted) == n:
                    adopted_all.set()
        except BaseException as exc:  # reported below, not lost with the thread
            failed.append(exc)
            adopted_all.set()
    with contextlib.ExitStack() as stack:
        stack.callback(sides.close)
        stack.callback(_close_all, adopted)
        cps = [Checkpointer(sides.agent.socket_path, name=f"bench-fo-{i}").connect()
               for i in range(4)]
        stack.callback(_close_all, cps)
        threading.Thread(target=adopter, daemon=True, name="bench-adopter").start()
        lst = lab.call("origin", _listener, lab.service(4), PORT_IDLE)
        peers = Peers(lab, PORT_IDLE, n)
        stack.callback(peers.kill)
        socks = []
        lst.settimeout(120)
        for _ in range(n):
            socks.append(lst.accept()[0])
        lst.close()
        stack.callback(_close_all, socks)
        peers.ready()
        t0 = time.perf_counter()
        _guard_all(cps, socks)
        log.info("restore_registered", connections=n,
                 seconds=round(time.perf_counter() - t0, 1))
        lab.crash("origin")
        # the crash killed the origin's processes, whose sockets the kernel closed; these are
        # this process's, outside the namespace: close them as the crash would have (what
        # they send dies at the cut), which also leaves descriptors for the adopted ones
        _close_all(socks)
        timeline = sides.timeline(300)
        adopted_all.wait(120)
        if failed:
            log.error("adopter_failed", error=repr(failed[0]), adopted=len(adopted))
    restore_s = (timeline["restored_ms"] - timeline["claimed_ms"]) / 1000
    return {"connections": n, "resurrected": timeline["resurrected"],
            "adopted": len(adopted), "restore_s": round(restore_s, 3),
            "per_s": round(timeline["resurrected"] / restore_s) if restore_s > 0 else None,
            "timeline_ms": {k[:-3]: v for k, v in timeline.items() if k.endswith("_ms")}}


def _close_all(things: list[Any]) -> None:
    for thing in things:
        thing.close()


def _listener(address: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(4096)
    return s


# ------------------------------------------------------------------ run and report

def run(args: argparse.Namespace) -> int:
    s = Settings.of(args)
    raise_fd_limit()  # 10,000 connections: this process's, the peers' and the daemons'
    loadavg = os.getloadavg()[0]
    rounds = []
    for number in range(1, s.rounds + 1):
        workdir = Path(tempfile.mkdtemp(prefix="tcpcp-bench-failover-"))
        try:
            with Lab() as lab:
                log.info("phase_started", phase="timeline", round=number)
                rounds.append(_timeline_round(lab, workdir, s, number))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix="tcpcp-bench-failover-"))
    try:
        with Lab() as lab:
            log.info("phase_started", phase="restore", connections=s.restore_connections)
            restore = _restore(lab, workdir, s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = _summarise(rounds, restore, s, loadavg)
    _report(results, args.output)
    return 0 if all(r["ok"] for r in rounds) else 1


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _summarise(rounds: list[dict[str, Any]], restore: dict[str, Any], s: Settings,
               loadavg: float) -> dict[str, Any]:
    c2fb = {k: _median([r["crash_to_first_byte_ms"][k] for r in rounds])
            for k in ("first", "median", "last")}
    after_detect = _median([r["first_byte_after_detect_ms"] for r in rounds])
    restore_10k = restore["restore_s"] if restore["connections"] == TARGET_RESTORE_CONNECTIONS \
        else None
    targets = {
        "first_byte_after_detect_ms": {"target": TARGET_FIRST_BYTE_AFTER_DETECT_MS,
                                       "value": after_detect,
                                       "met": after_detect is not None
                                       and after_detect <= TARGET_FIRST_BYTE_AFTER_DETECT_MS},
        "restore_10k_s": {"target": TARGET_RESTORE_10K_S, "value": restore_10k,
                          "met": None if restore_10k is None
                          else restore_10k <= TARGET_RESTORE_10K_S},
        "crash_to_first_byte_ms": {"target": s.ttl_ms + TARGET_OVER_TTL_MS,
                                   "value": c2fb["first"],
                                   "met": c2fb["first"] is not None
                                   and c2fb["first"] <= s.ttl_ms + TARGET_OVER_TTL_MS},
    }
    return {
        "rounds": rounds,
        "crash_to_first_byte_ms": c2fb,
        "first_byte_after_detect_ms": after_detect,
        "detect_after_crash_ms": _median([r["detect_after_crash_ms"] for r in rounds]),
        "timeline_ms": {k: _median([r["timeline_ms"].get(k) for r in rounds])
                        for k in rounds[0]["timeline_ms"]} if rounds else {},
        "restore": restore,
        "restore_10k_s": restore_10k,
        "baseline": {"lease_ttl_ms": s.ttl_ms},
        "ratios": {"crash_to_first_byte_over_ttl": round(c2fb["first"] / s.ttl_ms, 3)
                   if c2fb["first"] is not None else None},
        "targets": targets,
        "verdicts": {"rounds_ok": sum(r["ok"] for r in rounds), "rounds": len(rounds)},
        "settings": {"quick": s.quick, "rounds": s.rounds, "connections": s.connections,
                     "restore_connections": s.restore_connections,
                     "read_kbps": s.read_kbps, "lease_ttl_ms": s.ttl_ms,
                     "poll_ms": s.poll_ms, "takeover": "address", "gate_backend": "bpf"},
        "loadavg_1m": round(loadavg, 2),
    }


def _report(results: dict[str, Any], output: Path) -> None:
    def line(label: str, value: Any) -> None:
        print(f"  {label:<{LABEL}} {value}")
    c2fb = results["crash_to_first_byte_ms"]
    print(f"failover ({results['settings']['rounds']} rounds of "
          f"{results['settings']['connections']} downloads, lease TTL "
          f"{results['settings']['lease_ttl_ms']} ms)")
    line("crash -> first byte, first / median / last", f"{c2fb['first']} / {c2fb['median']} / "
         f"{c2fb['last']} ms")
    line("crash -> lease expiry seen", f"{results['detect_after_crash_ms']} ms")
    line("expiry seen -> first byte", f"{results['first_byte_after_detect_ms']} ms")
    line("timeline after expiry seen (ms)", json.dumps(results["timeline_ms"]))
    line("crash -> first byte / TTL", results["ratios"]["crash_to_first_byte_over_ttl"])
    line("rounds with every download whole, no RST", f"{results['verdicts']['rounds_ok']} of "
         f"{results['verdicts']['rounds']}")
    r = results["restore"]
    line(f"restore of {r['connections']} connections", f"{r['restore_s']} s ({r['per_s']}/s), "
         f"handed after {r['timeline_ms'].get('handed')} ms, {r['adopted']} adopted")
    for name, t in results["targets"].items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        line(f"target {name} <= {t['target']}", f"{t['value']}: {verdict}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {output}")
