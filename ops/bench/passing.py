"""Connection passing: per-connection dump/restore/activate µs in bulk, isolation to first byte.

For 1, 100, 1,000 and 10,000 idle connections peer -> service (origin) in the lab: dump all
(staying in repair mode), discard them, restore all in standby's namespace, switch the route,
activate all; each phase timed and divided by the count. Then, over 5 runs of one connection
holding unsent bytes, the time from isolating it on origin to the peer receiving its first byte
from standby (dump, discard, restore, route switch and activation included), and from activation
alone; isolated by the ACK gate's freeze + quarantine (first_byte_ms) and by nftables.
Writes bench/passing.json: per_conn_us (keyed by count: dump + restore + activate), phases_us,
first_byte_ms, first_byte_ms_by_isolation, first_byte_phases_ms, activation_to_first_byte_ms.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from kernel import repair
from ops.apps.demo_server import raise_fd_limit
from kernel.isolation import FlowIsolation, GateIsolation, Isolation, flow_of
from kernel.sanity import RestorePolicy
from ops.lab import Lab

log = structlog.get_logger(component="tcpcp.bench.passing")
BASE_PORT = 9300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", default="1,100,1000,10000",
                        help="connection counts, comma separated (default 1,100,1000,10000)")
    parser.add_argument("--first-byte-runs", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("bench/passing.json"))


_PEER_SCRIPT = """
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((addr, port), timeout=10) for _ in range(n)]
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "ping":
        for i in map(int, words[1:]):
            socks[i].sendall(b"ping")
        print("pinged", flush=True)
    else:
        break
"""


class _Peers:
    """n connections to service:port held by a process in peer's namespace (the file
    descriptor limit would not hold both ends of 10,000 connections in one process)."""

    def __init__(self, lab: Lab, n: int, port: int) -> None:
        self.proc = lab.popen("peer", [sys.executable, "-c", _PEER_SCRIPT, lab.service(4),
                                       str(port), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def ready(self) -> None:
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError("the peer process could not open its connections")

    def ping(self, indices: list[int]) -> None:
        self.stdin.write("ping " + " ".join(map(str, indices)) + "\n")
        self.stdin.flush()
        self.stdout.readline()

    def close(self) -> None:
        self.stdin.write("quit\n")
        self.stdin.flush()
        self.proc.wait(timeout=60)


def _accept_all(lab: Lab, n: int, port: int) -> tuple[_Peers, list[socket.socket]]:
    with lab.enter("origin"):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((lab.service(4), port))
        ls.listen(4096)
    peers = _Peers(lab, n, port)
    origins = [ls.accept()[0] for _ in range(n)]
    peers.ready()
    ls.close()
    return peers, origins


def _bulk(lab: Lab, n: int, port: int) -> dict[str, float]:
    peers, origins = _accept_all(lab, n, port)
    policy = RestorePolicy.serving(lab.service(4))
    t0 = time.perf_counter()
    icis = repair.dump_many(origins, stay_in_repair=True)
    t1 = time.perf_counter()
    for s in origins:
        s.close()  # in repair mode: silent
    t2 = time.perf_counter()
    with lab.enter("standby"):
        restored, failed = repair.restore_many(icis, policy)
    t3 = time.perf_counter()
    if failed:
        raise RuntimeError(f"{len(failed)} restores failed, first: {failed[0][1]}")
    lab.switch_route("standby")
    t4 = time.perf_counter()
    socks = repair.activate_many(restored)
    t5 = time.perf_counter()
    probe = sorted({0, n // 2, n - 1})  # the passed connections still carry bytes
    peers.ping(probe)
    for i in probe:
        socks[i].settimeout(5)
        if socks[i].recv(4) != b"ping":
            raise RuntimeError(f"passed connection {i} lost its peer's bytes")
    peers.close()
    for s in socks:
        s.close()
    lab.switch_route("origin")
    per = {"dump": (t1 - t0), "discard": (t2 - t1), "restore": (t3 - t2),
           "switch": (t4 - t3), "activate": (t5 - t4)}
    return {k: v * 1e6 / n for k, v in per.items()}


def _isolation(kind: str) -> FlowIsolation:
    """An isolation ready to use (tables made, programs attached) in the current namespace."""
    if kind == "gate":
        return GateIsolation("eth0")
    iso = Isolation(table="tcpcp_bench_fb")
    iso.prepare()
    return iso


def _first_byte(lab: Lab, port: int, kind: str) -> dict[str, float]:
    """Milliseconds from isolation to the peer's first byte from the destination, by phase."""
    with lab.enter("origin"):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((lab.service(4), port))
        ls.listen()
    with lab.enter("peer"):
        peer = socket.create_connection((lab.service(4), port), timeout=10)
    origin = ls.accept()[0]
    ls.close()
    got: dict[str, float] = {}

    def read() -> None:
        peer.settimeout(10)
        data = peer.recv(100)
        got["t"] = time.perf_counter()
        got["n"] = len(data)

    reader = threading.Thread(target=read)
    reader.start()
    with lab.enter("origin"):
        isolation = _isolation(kind)
    try:
        t0 = time.perf_counter()
        with lab.enter("origin"):  # nft runs as a child process in the caller's namespace
            isolation.add([flow_of(origin)], [origin])
        t_iso = time.perf_counter()
        origin.sendall(b"x" * 100)  # held back by the isolation: unsent at the dump
        ici = repair.dump(origin, stay_in_repair=True)
        origin.close()
        t_dump = time.perf_counter()
        with lab.enter("standby"):
            restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)))
        t_restore = time.perf_counter()
        lab.switch_route("standby")
        t_act = time.perf_counter()
        sock = repair.activate(restored)
        reader.join(timeout=10)
        if "t" not in got:
            raise RuntimeError("the peer received nothing from the destination")
    finally:
        with lab.enter("origin"):
            isolation.close()
    sock.close()
    peer.close()
    lab.switch_route("origin")
    return {"total": (got["t"] - t0) * 1e3, "isolate": (t_iso - t0) * 1e3,
            "dump": (t_dump - t_iso) * 1e3, "restore": (t_restore - t_dump) * 1e3,
            "switch_route": (t_act - t_restore) * 1e3, "activate_to_byte": (got["t"] - t_act) * 1e3}


def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    counts = [int(c) for c in args.counts.split(",") if c]
    results: dict[str, Any] = {"per_conn_us": {}, "phases_us": {}}
    with Lab() as lab:
        _bulk(lab, 10, BASE_PORT + 200)  # warm-up (imports, first cffi use), not recorded
        for i, n in enumerate(counts):
            phases = _bulk(lab, n, BASE_PORT + i)
            total = phases["dump"] + phases["restore"] + phases["activate"]
            results["per_conn_us"][str(n)] = round(total, 1)
            results["phases_us"][str(n)] = {k: round(v, 1) for k, v in phases.items()}
            print(f"{n:>6} conns: dump {phases['dump']:.1f} + restore {phases['restore']:.1f} "
                  f"+ activate {phases['activate']:.1f} = {total:.1f} us/conn "
                  f"(discard {phases['discard']:.1f}, switch {phases['switch']:.1f})")
        firsts = {kind: [_first_byte(lab, BASE_PORT + 100 + 10 * k + r, kind)
                         for r in range(args.first_byte_runs)]
                  for k, kind in enumerate(("gate", "nft"))}
    fb_phases = {kind: {p: round(statistics.median(run[p] for run in runs), 3) for p in runs[0]}
              for kind, runs in firsts.items()}
    results["first_byte_ms"] = round(fb_phases["gate"]["total"], 2)
    results["first_byte_ms_by_isolation"] = {k: round(v["total"], 2) for k, v in fb_phases.items()}
    results["first_byte_phases_ms"] = fb_phases
    results["activation_to_first_byte_ms"] = fb_phases["gate"]["activate_to_byte"]
    for kind, ph in fb_phases.items():
        print(f"isolation ({kind}) -> first byte from destination: {ph['total']:.2f} ms median "
              f"(isolate {ph['isolate']:.2f}, dump {ph['dump']:.2f}, restore {ph['restore']:.2f},"
              f" route switch {ph['switch_route']:.2f}, activation -> byte "
              f"{ph['activate_to_byte']:.3f})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.output}")
    return 0
