"""ACK gate: 50 MB upload throughput gated vs ungated, and commit-to-ACK-on-the-wire latency.

Runs in its own lab (MTU 1500). Throughput: the peer uploads --size bytes to the origin, whose
receiver reads with 1 MiB buffers (timed from accept to end of stream); ungated (no gate
attached, the namespace's defaults) and gated (gate attached, guarded port: no SACK for the
flow, server TFO off; the default commit policy: idle flush + 5 ms timer, forced ACK on every
commit)
alternate --runs times in the same run; throughput_ratio = median gated / median ungated MB/s.
Latency: on a guarded connection the peer sends --messages messages of 1000 bytes, 2 ms apart;
the origin commits each as soon as it has read it. A capture on the gateway (outside the origin)
gives the time the first segment carrying the committed ack crossed the wire; the difference to
the instant before the commit is the commit-to-ACK latency (p50, p99 in microseconds).
Writes bench/ackgate.json: throughput_ratio, commit_to_ack_us_p50, commit_to_ack_us_p99,
gated_mb_s, ungated_mb_s, commits_per_upload, backend.

--backend patch measures the kernel series' TCP_COMMIT_SEQ instead (ops/kernel/bench_guest.py:
a veth pair at MTU 1500, a commit after every read, the ACK stamped on the peer's interface).
On a kernel without the option it builds (cached) and boots the patched kernel under qemu and
runs itself there; the figures keep the same keys, with "backend": "patch". TCG emulation: they
compare the variants measured in that guest, not with the host's bpf figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import structlog

from checkpointer.commit_policy import (
    CommitPolicy,
)
from kernel import patch_gate
from kernel.gate import AckGate
from kernel.seq import seq_diff
from ops import gatelab, netns
from ops.lab import Lab

log = structlog.get_logger()

_UPLOAD = r"""
import socket, sys
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port))
block = b"u" * 65536
sent = 0
while sent < total:
    sent += s.send(block[: total - sent])
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""

_MESSAGES = r"""
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(count):
    s.sendall(b"m" * 1000)
    time.sleep(0.002)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=50_000_000, help="upload size in bytes")
    parser.add_argument("--runs", type=int, default=9, help="uploads per variant (median)")
    parser.add_argument("--interval-ms", type=float, default=None,
                        help="commit timer of the gated upload's policy (default: the default "
                        "policy's)")
    parser.add_argument("--every-bytes", type=int, default=None,
                        help="also commit every this many bytes (default: no byte threshold)")
    parser.add_argument("--messages", type=int, default=1000,
                        help="commits measured for the latency figures")
    parser.add_argument("--output", type=Path, default=Path("bench/ackgate.json"))
    parser.add_argument("--backend", choices=[b.value for b in patch_gate.Backend],
                        default=patch_gate.Backend.BPF.value,
                        help="gate measured: bpf (tc program, this host) or patch "
                        "(TCP_COMMIT_SEQ; boots the patched kernel under qemu when this "
                        "kernel lacks it)")
    parser.add_argument("--guest-timeout", type=float, default=1800.0,
                        help="seconds the patched guest may take (--backend patch, booted)")


def _upload(lab: Lab, port: int, size: int, gate: AckGate | None, policy: CommitPolicy
            ) -> tuple[float, int]:
    srv = lab.call("origin", gatelab.listener, 4, port)
    try:
        fut = lab.submit("origin", gatelab.receive_gated, srv, gate, policy, gatelab.Received(),
                         digest=False)
        lab.run("peer", [sys.executable, "-c", _UPLOAD, lab.service(4), str(port), str(size)],
                check=True, timeout=180)
        got = fut.result(timeout=180)
    finally:
        srv.close()
    if got.nbytes != size:
        raise RuntimeError(f"expected {size} bytes uploaded, got {got.nbytes}")
    return size / got.seconds / 1e6, len(got.commits)


def _latency(lab: Lab, gate: AckGate, port: int, messages: int) -> list[float]:
    pcap = Path(tempfile.mkstemp(prefix="ackgate-", suffix=".pcap")[1])
    cap = gatelab.start_capture(netns.command(lab.netns("gw"), []), "p-origin", pcap,
                                f"tcp src port {port}")
    srv = lab.call("origin", gatelab.listener, 4, port)
    try:
        # commit as soon as each message is read: an every-byte policy with no timer
        fut = lab.submit("origin", gatelab.receive_gated, srv, gate,
                         CommitPolicy(interval_s=None, every_bytes=1), gatelab.Received(),
                         digest=False)
        lab.run("peer", [sys.executable, "-c", _MESSAGES, lab.service(4), str(port),
                         str(messages)], check=True, timeout=120)
        commits = fut.result(timeout=120).commits
    finally:
        srv.close()
        gatelab.stop_capture(cap)
    acks = [(c.time, c.ack) for c in gatelab.read_pcap(pcap)
            if c.sport == port and c.flags & 0x10]
    pcap.unlink()
    samples, j = [], 0
    for t, seq in commits:
        while j < len(acks) and acks[j][0] < t:
            j += 1
        k = j
        while k < len(acks) and seq_diff(acks[k][1], seq) < 0:
            k += 1
        if k < len(acks):
            samples.append((acks[k][0] - t) * 1e6)
    return samples


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> int:
    if args.backend == patch_gate.Backend.PATCH.value:
        return _run_patch(args)
    default = CommitPolicy()
    policy = CommitPolicy(
        interval_s=default.interval_s if args.interval_ms is None else args.interval_ms / 1000,
        every_bytes=args.every_bytes)
    with Lab(stores=1) as lab:
        ungated, gated, commits = [], [], []
        for i in range(args.runs):
            # the baseline runs with no gate attached and the namespace's defaults (SACK on)
            ungated.append(_upload(lab, 5600, args.size, None, policy)[0])
            with AckGate("eth0", netns=lab.netns("origin")) as gate:
                gate.guard_listen(5601)
                mb_s, n = _upload(lab, 5601, args.size, gate, policy)
            gated.append(mb_s)
            commits.append(n)
            log.info("upload_pair", run=i, ungated_mb_s=round(ungated[-1]),
                     gated_mb_s=round(mb_s), commits=n)
        with AckGate("eth0", netns=lab.netns("origin")) as gate:
            gate.guard_listen(5602)
            samples = _latency(lab, gate, 5602, args.messages)
    if len(samples) < args.messages // 2:
        print(f"only {len(samples)} of {args.messages} commits matched an ACK on the wire",
              file=sys.stderr)
        return 1
    results = {
        "throughput_ratio": round(statistics.median(gated) / statistics.median(ungated), 3),
        "gated_mb_s": round(statistics.median(gated), 1),
        "ungated_mb_s": round(statistics.median(ungated), 1),
        "commits_per_upload": int(statistics.median(commits)),
        "commit_to_ack_us_p50": round(_pct(samples, 50), 1),
        "commit_to_ack_us_p99": round(_pct(samples, 99), 1),
        "latency_samples": len(samples),
        "upload_bytes": args.size,
        "policy_interval_ms": None if policy.interval_s is None else policy.interval_s * 1000,
        "policy_every_bytes": policy.every_bytes,
        "backend": patch_gate.Backend.BPF.value,
    }
    _report(results, args.output)
    return 0


def _report(results: dict[str, object], output: Path) -> None:
    for key, value in results.items():
        print(f"{key:24} {value}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {output}")


def _run_patch(args: argparse.Namespace) -> int:
    """The patch backend's figures: measured here when this kernel has TCP_COMMIT_SEQ, else
    in the patched guest (which runs this same command)."""
    if args.interval_ms is not None or args.every_bytes is not None:
        print("--interval-ms/--every-bytes apply to --backend bpf only (the patch bench "
              "commits after every read)", file=sys.stderr)
        return 2
    if patch_gate.commit_option_present():
        from ops.kernel import bench_guest

        results = bench_guest.measure(args.size, args.runs, args.messages)
    else:
        booted = _measure_in_guest(args)
        if booted is None:
            return 1
        results = booted
    results["backend"] = patch_gate.Backend.PATCH.value
    _report(results, args.output)
    return 0


def _measure_in_guest(args: argparse.Namespace) -> dict[str, object] | None:
    """Boot the patched kernel (cached build) and run `bench ackgate --backend patch` in it."""
    from ops.kernel.build import Flavour, build
    from ops.kernel.qemu import boot

    kernel = build(Flavour.PATCHED)
    command = (f".venv/bin/python -m ops.cli bench ackgate --backend patch --size {args.size} "
               f"--runs {args.runs} --messages {args.messages} "
               "--output $TCPCP_JOB_DIR/ackgate.json")
    log.info("ackgate_patch_guest", bzimage=str(kernel.bzimage), command=command)
    guest = boot(kernel.bzimage, command, timeout=args.guest_timeout)
    raw = guest.files.get("ackgate.json")
    if not guest.verdict.passed or raw is None:
        print(f"expected the patched guest to write ackgate.json, got "
              f"{guest.verdict.outcome.value} ({guest.verdict.detail}); log {guest.log_path}",
              file=sys.stderr)
        return None
    figures: dict[str, object] = json.loads(raw)
    figures["guest_seconds"] = guest.seconds
    return figures
