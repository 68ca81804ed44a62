"""ACK gate: 50 MB upload throughput gated vs ungated, and commit-to-ACK-on-the-wire latency,
for either gate backend or both, measured by the same code through kernel.gatebackend.

Runs in its own lab (MTU 1500). Throughput: the peer uploads --size bytes to the origin, whose
receiver reads with 1 MiB buffers (timed from accept to end of stream); ungated (no gate, the
namespace's defaults) and gated (a guarded listener; the default commit policy: idle flush +
5 ms timer, an ACK leaving on every commit) alternate --runs times in the same run;
throughput_ratio = median gated / median ungated MB/s.
Latency: on a guarded connection the peer sends --messages messages of 1000 bytes, 2 ms apart;
the origin commits each as soon as it has read it. A capture on the gateway (outside the origin)
gives the time the first segment carrying the committed ack crossed the wire; the difference to
the instant before the commit is the commit-to-ACK latency (p50, p99 in microseconds).

--backend bpf (default) measures the eBPF gate (kernel/gate.py), patch the kernel series'
TCP_COMMIT_SEQ, both the two in the same lab one after the other. When this kernel lacks the
series (patch or both asked), it builds (cached) and boots the patched kernel under qemu and
runs this same command there; "guest_seconds" then says how long the guest ran. Under TCG
emulation the figures compare variants measured in that guest with each other, not with the
host's.
Writes --output (bench/ackgate.json): for one backend throughput_ratio, commit_to_ack_us_p50,
commit_to_ack_us_p99, gated_mb_s, ungated_mb_s, commits_per_upload, latency_samples, backend;
for both, those figures under "bpf" and "patch", and patch_vs_bpf_gated_mb_s (their ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import structlog

from checkpointer.commit_policy import (
    CommitPolicy,
)
from kernel import patch_gate
from kernel.gatebackend import Gate, open_gate
from kernel.patch_gate import Backend
from kernel.seq import seq_diff
from ops import gatelab
from ops.capture import ACK
from ops.lab import Lab

log = structlog.get_logger(component="tcpcp.ops.bench.ackgate")

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
    parser.add_argument("--backend", choices=[b.value for b in Backend] + [BOTH],
                        default=Backend.BPF.value,
                        help="gate measured: bpf (tc program), patch (TCP_COMMIT_SEQ) or both "
                        "in the same lab; patch and both boot the patched kernel under qemu "
                        "when this kernel lacks it")
    parser.add_argument("--guest-timeout", type=float, default=1800.0,
                        help="seconds the patched guest may take (--backend patch, booted)")


BOTH = "both"


def _upload(lab: Lab, port: int, size: int, gate: Gate | None, policy: CommitPolicy
            ) -> tuple[float, int]:
    srv = lab.call("origin", gatelab.listener, 4, port)
    try:
        if gate is not None:
            gate.guard_listen(srv)
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


def _latency(lab: Lab, gate: Gate, port: int, messages: int) -> tuple[list[float], int]:
    """Commit-to-ACK samples in µs, and how many commits were made (a slow receiver reads
    several messages at once, so there may be fewer commits than messages)."""
    cap = gatelab.gateway_capture(lab, f"tcp src port {port}").start()
    srv = lab.call("origin", gatelab.listener, 4, port)
    try:
        gate.guard_listen(srv)
        # commit as soon as each message is read: an every-byte policy with no timer
        fut = lab.submit("origin", gatelab.receive_gated, srv, gate,
                         CommitPolicy(interval_s=None, every_bytes=1), gatelab.Received(),
                         digest=False)
        lab.run("peer", [sys.executable, "-c", _MESSAGES, lab.service(4), str(port),
                         str(messages)], check=True, timeout=120)
        commits = fut.result(timeout=120).commits
    finally:
        srv.close()
        cap.stop()
    acks = [(s.at, s.ack) for s in cap.segments() if s.sport == port and s.flags & ACK]
    # The gate lets no ACK at or beyond a commit leave before it, so the first ACK in capture
    # order that covers a commit's sequence is that commit's: matched by sequence, not by time
    # (a qemu guest's clock ticks in 4 ms steps, so capture and commit times are coarse there;
    # a latency below one tick reads as 0).
    samples, k = [], 0
    for t, seq in commits:
        while k < len(acks) and seq_diff(acks[k][1], seq) < 0:
            k += 1
        if k < len(acks):
            samples.append(max(0.0, acks[k][0] - t) * 1e6)
    return samples, len(commits)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> int:
    backends = [Backend.BPF, Backend.PATCH] if args.backend == BOTH else [Backend(args.backend)]
    if Backend.PATCH in backends and not patch_gate.commit_option_present():
        return _run_in_guest(args)
    default = CommitPolicy()
    policy = CommitPolicy(
        interval_s=default.interval_s if args.interval_ms is None else args.interval_ms / 1000,
        every_bytes=args.every_bytes)
    figures: dict[str, dict[str, object]] = {}
    gated: dict[str, float] = {}
    matched: dict[str, tuple[int, int]] = {}
    with Lab(stores=1) as lab:
        for n, backend in enumerate(backends):
            b = backend.value
            figures[b], gated[b], matched[b] = _measure(lab, backend, policy, args, 5600 + 10 * n)
    if any(m == 0 or 2 * m < n_made for m, n_made in matched.values()):
        print("expected at least half of the latency run's commits to match an ACK on the wire, "
              f"got (matched, commits) {matched}", file=sys.stderr)
        return 1
    if len(figures) == 1:
        _report(next(iter(figures.values())), args.output)
        return 0
    both: dict[str, object] = dict(figures)
    both["patch_vs_bpf_gated_mb_s"] = round(gated["patch"] / gated["bpf"], 3)
    _report(both, args.output)
    return 0


def _measure(lab: Lab, backend: Backend, policy: CommitPolicy, args: argparse.Namespace,
             port: int) -> tuple[dict[str, object], float, tuple[int, int]]:
    """The backend's figures, its median gated MB/s, and (commits matched to an ACK on the
    wire, commits made) of the latency run."""
    ungated, gated, commits = [], [], []
    for i in range(args.runs):
        # the baseline runs with no gate and the namespace's defaults (SACK on)
        ungated.append(_upload(lab, port, args.size, None, policy)[0])
        with open_gate("eth0", backend=backend, netns=lab.netns("origin")) as gate:
            mb_s, n = _upload(lab, port + 1, args.size, gate, policy)
        gated.append(mb_s)
        commits.append(n)
        log.info("upload_pair", backend=backend.value, run=i, ungated_mb_s=round(ungated[-1]),
                 gated_mb_s=round(mb_s), commits=n)
    with open_gate("eth0", backend=backend, netns=lab.netns("origin")) as gate:
        samples, made = _latency(lab, gate, port + 2, args.messages)
    figures: dict[str, object] = {
        "throughput_ratio": round(statistics.median(gated) / statistics.median(ungated), 3),
        "gated_mb_s": round(statistics.median(gated), 1),
        "ungated_mb_s": round(statistics.median(ungated), 1),
        "commits_per_upload": int(statistics.median(commits)),
        "commit_to_ack_us_p50": round(_pct(samples, 50), 1) if samples else None,
        "commit_to_ack_us_p99": round(_pct(samples, 99), 1) if samples else None,
        "latency_samples": len(samples),
        "upload_bytes": args.size,
        "policy_interval_ms": None if policy.interval_s is None else policy.interval_s * 1000,
        "policy_every_bytes": policy.every_bytes,
        "backend": backend.value,
    }
    return figures, statistics.median(gated), (len(samples), made)


def _report(results: dict[str, object], output: Path) -> None:
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"== backend {key}")
            for k, v in value.items():
                print(f"  {k:24} {v}")
        else:
            print(f"{key:24} {value}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {output}")


def _run_in_guest(args: argparse.Namespace) -> int:
    """Boot the patched kernel (cached build) and run this same bench in it."""
    from ops.kernel.build import Flavour, build
    from ops.kernel.qemu import boot

    kernel = build(Flavour.PATCHED)
    policy = "".join(f" --{name} {value}" for name, value in
                     (("interval-ms", args.interval_ms), ("every-bytes", args.every_bytes))
                     if value is not None)
    command = (f".venv/bin/python -m ops.cli bench ackgate --backend {args.backend} "
               f"--size {args.size} --runs {args.runs} --messages {args.messages}{policy} "
               "--output $TCPCP_JOB_DIR/ackgate.json")
    log.info("ackgate_guest", bzimage=str(kernel.bzimage), command=command)
    guest = boot(kernel.bzimage, command, timeout=args.guest_timeout)
    raw = guest.files.get("ackgate.json")
    if not guest.verdict.passed or raw is None:
        print(f"expected the patched guest to write ackgate.json, got "
              f"{guest.verdict.outcome.value} ({guest.verdict.detail}); log {guest.log_path}",
              file=sys.stderr)
        return 1
    figures: dict[str, object] = json.loads(raw)
    figures["guest_seconds"] = guest.seconds
    _report(figures, args.output)
    return 0
