"""`tcpcp bench ackgate --backend patch` on the host (stock kernel) boots the patched guest,
measures TCP_COMMIT_SEQ there and writes the eBPF bench's keys with "backend": "patch"; the
default still measures the eBPF gate on the host and says so. Small sizes: this checks the
plumbing, the figures themselves are the benchmark's business."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.patch_gate import commit_option_present

pytestmark = pytest.mark.timeout(900)

KEYS = {"throughput_ratio", "commit_to_ack_us_p50", "commit_to_ack_us_p99", "gated_mb_s",
        "ungated_mb_s", "backend"}


def _bench(tmp_path: Path, *extra: str) -> dict[str, object]:
    out = tmp_path / "ackgate.json"
    done = subprocess.run([sys.executable, "-m", "ops.cli", "bench", "ackgate", "--size",
                           "2000000", "--runs", "1", "--messages", "50", "--output", str(out),
                           *extra], capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, object] = json.loads(out.read_text())
    assert figures.keys() >= KEYS, figures
    for key in KEYS - {"backend"}:
        value = figures[key]
        assert isinstance(value, float | int) and math.isfinite(value) and value > 0, figures
    assert "throughput_ratio" in done.stdout
    return figures


def test_the_patch_backend_bench_runs_in_the_patched_guest_and_reports_the_same_keys(
        tmp_path: Path) -> None:
    assert not commit_option_present()  # so the bench has to boot the guest
    figures = _bench(tmp_path, "--backend", "patch")
    assert figures["backend"] == "patch"
    assert isinstance(figures["guest_seconds"], float | int) and figures["guest_seconds"] > 0


def test_the_default_backend_bench_measures_the_ebpf_gate_on_the_host(tmp_path: Path) -> None:
    figures = _bench(tmp_path)
    assert figures["backend"] == "bpf"
    assert "guest_seconds" not in figures
