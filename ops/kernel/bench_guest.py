"""Patch-backend ACK gate, measured inside the guest: upload throughput gated vs ungated, and
commit-to-ACK latency on the wire.

Inside the guest:  python -m ops.kernel.bench_guest [--size N] [--runs N] [--messages N]
From the host:     python -m ops.kernel.bench_guest --boot   (builds the patched kernel, boots
                   it, runs itself inside, prints the figures, writes bench/kernel_guest.json)
--with-bpf also runs the eBPF gate's bench (`tcpcp bench ackgate`, its own lab and its default
commit policy) in the same guest, so both backends are measured on the same kernel; its figures
go under "bpf" next to "patch".

Throughput: the peer uploads --size bytes to the origin over a veth pair at MTU 1500; the
origin reads with 1 MiB buffers (timed from accept to end of stream). Gated: the origin commits
after every read (what the idle flush of the default commit policy does when reads drain the
socket), so TCP_COMMIT_SEQ sends each ACK; ungated: no commit option. The two alternate --runs
times; throughput_ratio = median gated / median ungated MB/s.
Latency: on a gated connection the peer sends --messages messages of 1000 bytes, 2 ms apart;
the origin commits each once read. An AF_PACKET socket on the peer's interface stamps (kernel
receive time, SO_TIMESTAMPNS) the first segment carrying the committed ack; its distance to the
wall clock read just before the commit is the commit-to-ACK latency (p50, p99 in microseconds).
Figures under TCG emulation compare the variants with each other, not with real hardware.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

from kernel import patch_gate
from kernel.seq import after, seq_add
from ops.kernel.guestnet import ETH_P_ALL, VethPair, parse_frame, run_in

SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33


def _upload(pair: VethPair, size: int, gated: bool, port: int) -> float:
    """One upload of size bytes, peer -> origin; returns MB/s at the origin."""
    server, client = pair.connect(4, guard_listen=gated, port=port)
    chunk = b"x" * (1 << 20)

    def send() -> None:
        left = size
        while left > 0:
            n = client.send(chunk[:min(left, len(chunk))])
            left -= n
        client.shutdown(socket.SHUT_WR)

    with server, client:
        start = time.monotonic()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = 0
        base = patch_gate.commit_info(server).commit_seq if gated else 0
        while data := server.recv(1 << 20):
            got += len(data)
            if gated:
                patch_gate.set_commit(server, seq_add(base, got))
        elapsed = time.monotonic() - start
        sender.join()
    if got != size:
        raise RuntimeError(f"expected {size} bytes uploaded, got {got}")
    return size / elapsed / 1e6


class _AckStamps:
    """Kernel receive times of the origin's ACK numbers, seen on the peer's interface."""

    def __init__(self, ns: str, origin: str) -> None:
        def open_socket() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind(("eth0", 0))
            s.settimeout(0.1)
            return s

        self.sock = run_in(ns, open_socket)
        self.origin = origin
        self.first_seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame, anc, _, _ = self.sock.recvmsg(65536, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            seg = parse_frame(frame, 0.0)
            if seg is None or seg.src != self.origin:
                continue
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", data[:16])
                    self.first_seen.setdefault(seg.ack, sec * 1_000_000_000 + nsec)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _latencies(pair: VethPair, messages: int, port: int) -> list[float]:
    stamps = _AckStamps(pair.peer_ns, pair.origin_addr(4))
    try:
        server, client = pair.connect(4, guard_listen=True, port=port)
        with server, client:
            base = patch_gate.commit_info(server).commit_seq
            message = b"m" * 1000

            def send() -> None:
                for _ in range(messages):
                    client.sendall(message)
                    time.sleep(0.002)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            committed: list[tuple[int, int]] = []
            got = 0
            while got < messages * len(message):
                got += len(server.recv(65536))
                seq = seq_add(base, got)
                if committed and not after(seq, committed[-1][0]):
                    continue
                before_ns = time.time_ns()
                patch_gate.set_commit(server, seq)
                committed.append((seq, before_ns))
            sender.join()
            deadline = time.monotonic() + 5
            while committed[-1][0] not in stamps.first_seen and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stamps.close()
    return [(stamps.first_seen[seq] - t) / 1000 for seq, t in committed
            if seq in stamps.first_seen]


def measure(size: int, runs: int, messages: int) -> dict[str, object]:
    gated: list[float] = []
    ungated: list[float] = []
    with VethPair() as pair:
        port = 6000
        for _ in range(runs):
            for is_gated, into in ((False, ungated), (True, gated)):
                port += 1
                into.append(_upload(pair, size, is_gated, port))
        lat = sorted(_latencies(pair, messages, port + 1))
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    return {
        "backend": "patch",
        "gated_mb_s": round(statistics.median(gated), 1),
        "ungated_mb_s": round(statistics.median(ungated), 1),
        "throughput_ratio": round(statistics.median(gated) / statistics.median(ungated), 3),
        "commit_to_ack_us_p50": round(statistics.median(lat), 1) if lat else float("nan"),
        "commit_to_ack_us_p99": round(p99, 1),
        "commits_measured": len(lat),
        "size": size,
        "runs": runs,
    }


def _print(figures: dict[str, object]) -> None:
    for key, value in figures.items():
        print(f"{key:24} {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=20_000_000, help="upload size in bytes")
    parser.add_argument("--runs", type=int, default=5, help="uploads per variant (median)")
    parser.add_argument("--messages", type=int, default=300, help="latency samples")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--boot", action="store_true",
                        help="on the host: build and boot the patched kernel, run inside")
    parser.add_argument("--with-bpf", action="store_true",
                        help="also run `tcpcp bench ackgate` (eBPF gate) in the same guest")
    parser.add_argument("--output", type=Path, default=Path("bench/kernel_guest.json"))
    args = parser.parse_args(argv)
    if args.boot:
        return _boot_and_run(args)
    figures: dict[str, object] = {"patch": measure(args.size, args.runs, args.messages)}
    if args.with_bpf:
        figures["bpf"] = _bpf_bench(args)
    for backend, values in figures.items():
        print(f"== backend {backend}")
        _print(values)  # type: ignore[arg-type]
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _bpf_bench(args: argparse.Namespace) -> dict[str, object]:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ackgate.json"
        subprocess.run([sys.executable, "-m", "ops.cli", "bench", "ackgate", "--size",
                        str(args.size), "--runs", str(args.runs), "--messages",
                        str(args.messages), "--output", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        figures: dict[str, object] = {"backend": "bpf", **json.loads(out.read_text())}
    return figures


def _boot_and_run(args: argparse.Namespace) -> int:
    from ops import logs
    from ops.kernel.build import Flavour, build
    from ops.kernel.qemu import boot

    logs.configure()
    kernel = build(Flavour.PATCHED)
    command = (f".venv/bin/python -m ops.kernel.bench_guest --size {args.size} "
               f"--runs {args.runs} --messages {args.messages} "
               "--json $TCPCP_JOB_DIR/kernel_guest.json"
               + (" --with-bpf" if args.with_bpf else ""))
    run = boot(kernel.bzimage, command, timeout=1800)
    raw = run.files.get("kernel_guest.json")
    if not run.verdict.passed or raw is None:
        print(f"guest bench failed: {run.verdict.outcome.value} ({run.verdict.detail}); "
              f"log {run.log_path}", file=sys.stderr)
        return 1
    figures = json.loads(raw)
    for backend, values in figures.items():
        print(f"== backend {backend}")
        _print(values)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
