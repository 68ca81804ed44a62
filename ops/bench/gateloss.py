"""ACK gate under loss: retransmission timeouts of gated uploads, by how the flow is guarded.

Runs in its own lab (MTU 1500; for the lossy path the peer's TSO/GSO go off so that one drop is
one segment: the higher packet rate also makes the lab's veth backlog drop a few). For each
guarding —
ungated (SACK on), guarded from the SYN-ACK (no SACK negotiated) and guarded mid-connection
(SACK negotiated, its blocks stripped by the gate) — --runs uploads of --size bytes cross a clean
path, then a path whose gateway drops one in --one-in data segments at random. Counts the peer's
(the sender's) retransmission timeouts (each a stall of at least 200 ms), fast recoveries
(Reno / SACK) and retransmitted segments, and the wall time of the runs.
Writes bench/gateloss.json: {path: {guarding: {timeouts, reno_recoveries, sack_recoveries,
retrans_segs, seconds}}} with path "clean" and "lossy".
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

from ops import gatelab as G
from ops.lab import Lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=50_000_000, help="upload size in bytes")
    parser.add_argument("--runs", type=int, default=10, help="uploads per guarding and path")
    parser.add_argument("--one-in", type=int, default=4096,
                        help="the lossy path drops one in this many data segments (power of 2)")
    parser.add_argument("--output", type=Path, default=Path("bench/gateloss.json"))


def _measure(lab: Lab, guarding: G.Guarding, runs: int, size: int,
             ports: itertools.count[int]) -> dict[str, float]:
    before, t0 = G.peer_counters(lab.run), time.monotonic()
    for _ in range(runs):
        G.upload(lab, next(ports), size, guarding)
    seen = G.peer_counters(lab.run) - before
    return {**dataclasses.asdict(seen), "seconds": round(time.monotonic() - t0, 2)}


def run(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, dict[str, float]]] = {"clean": {}, "lossy": {}}
    ports = itertools.count(6100)
    with Lab(stores=1) as lab:
        for guarding in G.Guarding:
            results["clean"][guarding.value] = _measure(lab, guarding, args.runs, args.size,
                                                        ports)
        lab.run("peer", ["ethtool", "-K", "eth0", "tso", "off", "gso", "off"], check=True,
                capture_output=True)
        with G.LossyLink(lab.netns("gw"), "p-origin", args.one_in):
            for guarding in G.Guarding:
                results["lossy"][guarding.value] = _measure(lab, guarding, args.runs,
                                                            args.size, ports)
    for path, by_guarding in results.items():
        for guarding_name, figures in by_guarding.items():
            print(f"{path:6} {guarding_name:15} " + " ".join(f"{k}={v}" for k, v in
                                                            figures.items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.output}")
    return 0
