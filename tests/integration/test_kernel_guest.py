"""The patched kernel, built from kernel/patches/ and booted under qemu, passes the guest suite
(tests/kernelguest) over veth at MTU 1500; the stock kernel in the same harness reports the
option absent and the gate falls back to bpf.

Builds both kernels (cached in TCPCP_KERNEL_CACHE; a cold build takes minutes) and boots each
once. The guest's verdict is read from its serial log: a panic, a hang or a missing verdict
fails the test like a failing guest test does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from ops.kernel.build import BuiltKernel, Flavour, build
from ops.kernel.qemu import GuestRun, Outcome, boot

pytestmark = pytest.mark.timeout(1800)

GUEST_PYTEST = (".venv/bin/python -m pytest tests/kernelguest -p no:cacheprovider -q "
                "-o addopts= -ra --junitxml=$TCPCP_JOB_DIR/junit.xml")


@pytest.fixture(scope="module")
def patched() -> Iterator[BuiltKernel]:
    yield build(Flavour.PATCHED)


@pytest.fixture(scope="module")
def stock() -> Iterator[BuiltKernel]:
    yield build(Flavour.STOCK)


def _guest_suite(kernel: BuiltKernel) -> GuestRun:
    return boot(kernel.bzimage, GUEST_PYTEST, timeout=900,
                env={"TCPCP_GUEST_FLAVOUR": kernel.flavour.value})


def _counts(run: GuestRun) -> dict[str, int]:
    xml = run.files.get("junit.xml", b"").decode()
    m = re.search(r'<testsuite [^>]*errors="(\d+)" failures="(\d+)" skipped="(\d+)" '
                  r'tests="(\d+)"', xml)
    assert m, f"expected a junit report from the guest, got {xml[:300]!r}"
    errors, failures, skipped, tests = map(int, m.groups())
    return {"errors": errors, "failures": failures, "skipped": skipped, "tests": tests}


def test_the_patched_kernel_passes_the_guest_suite(patched: BuiltKernel) -> None:
    run = _guest_suite(patched)
    tail = "\n".join(run.serial_log.splitlines()[-80:])
    assert run.verdict.outcome is Outcome.PASSED, f"{run.verdict.detail}\n{tail}"
    counts = _counts(run)
    assert counts["tests"] >= 15 and counts["failures"] == counts["errors"] == 0, counts
    assert counts["skipped"] == 0, counts


def test_the_stock_kernel_reports_the_option_absent_and_the_gate_falls_back_to_bpf(
        stock: BuiltKernel) -> None:
    run = _guest_suite(stock)
    tail = "\n".join(run.serial_log.splitlines()[-60:])
    assert run.verdict.outcome is Outcome.PASSED, f"{run.verdict.detail}\n{tail}"
    counts = _counts(run)
    assert counts["tests"] == 3 and counts["failures"] == counts["errors"] == 0, counts


def test_a_failing_guest_command_is_reported_with_its_exit_status(stock: BuiltKernel) -> None:
    run = boot(stock.bzimage, "echo about-to-fail; exit 7", timeout=120)
    assert run.verdict.outcome is Outcome.FAILED and run.verdict.exit_code == 7
    assert "about-to-fail" in run.serial_log


def test_a_guest_that_hangs_is_stopped_and_reported_without_verdict(stock: BuiltKernel) -> None:
    run = boot(stock.bzimage, "echo hanging; sleep 600", timeout=20)
    assert run.verdict.outcome is Outcome.NO_VERDICT and "hang" in run.verdict.detail
    assert "hanging" in run.serial_log and run.seconds < 60
