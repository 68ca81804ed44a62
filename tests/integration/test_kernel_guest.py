"""The patched kernel, built from kernel/patches/ and booted under qemu, passes the guest suite
(tests/kernelguest) over veth at MTU 1500 and the host's gate behaviour tests (the lab's
test_gate_lab.py, test_gate_crash.py, test_gate_probes.py and test_gate_commit_race.py,
every test taking `gate_backend`, and one end-to-end commit through the checkpointer daemon)
with backend `patch`; the stock kernel in the same harness
reports the option absent and the gate falls back to bpf.

Builds both kernels (cached in TCPCP_KERNEL_CACHE; a cold build takes minutes) and boots each
once. The guest's verdict is read from its serial log: a panic, a hang or a missing verdict
fails the test like a failing guest test does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from xml.etree import ElementTree

import pytest

from ops.kernel.build import BuiltKernel, Flavour, build
from ops.kernel.qemu import GuestRun, Outcome, boot
from tests.kernelguest.held_acks import Guarding

pytestmark = pytest.mark.timeout(1800)

GUEST_PYTEST = (".venv/bin/python -m pytest -p no:cacheprovider -q -o addopts= -ra "
                "--junitxml=$TCPCP_JOB_DIR/junit.xml tests/kernelguest")
# the lab's gate behaviour tests, run with the patch backend only (bpf runs on the host)
GATE_BEHAVIOUR = " ".join(
    [f"tests/integration/test_gate_{name}.py" for name in ("lab", "crash", "probes", "commit_race")]
    + ["tests/integration/test_checkpointer_agent.py::"
       "test_an_upload_is_committed_record_by_record_and_no_ack_passes_the_commit"]
    + ["-k patch"])
GATE_BEHAVIOUR_TESTS = {
    "test_gated_50mb_upload_arrives_intact_and_no_ack_above_commit_or_sack_leaves[patch-4]",
    "test_gated_50mb_upload_arrives_intact_and_no_ack_above_commit_or_sack_leaves[patch-6]",
    "test_gated_50mb_upload_completes_without_deadlock_under_other_policies[patch-every-64KiB]",
    "test_gated_50mb_upload_completes_without_deadlock_under_other_policies[patch-every-10ms]",
    "test_commit_is_followed_by_an_ack_carrying_it_without_waiting_for_the_peer[patch]",
    "test_after_origin_crash_the_peer_holds_every_byte_from_the_committed_sequence_on[patch]",
    "test_connection_restored_from_the_committed_state_receives_the_held_bytes_exactly_once"
    "[patch]",
    "test_keepalives_of_a_guarded_flow_leave_clamped_and_the_connection_survives[patch]",
    "test_zero_window_probes_of_a_guarded_flow_leave_clamped_and_the_connection_survives[patch]",
    "test_challenge_acks_of_a_guarded_flow_leave_clamped_and_the_connection_survives[patch]",
    "test_acks_of_concurrent_commits_never_go_back[patch]",
    "test_guarded_port_refuses_fast_open_data_in_the_syn[patch]",
    "test_peer_fin_is_acknowledged_only_once_committed_as_end_plus_one_even_from_time_wait"
    "[patch]",
    "test_no_sack_block_above_the_commit_leaves_a_flow_guarded_mid_connection[patch]",
    "test_an_upload_is_committed_record_by_record_and_no_ack_passes_the_commit[patch]",
}
# tests/kernelguest/test_patch_ecn_repair.py (0005) and its stock counterpart
ECN_REPAIR_TESTS = {
    "test_a_restored_ecn_flow_marks_its_new_data_ect0_and_tcp_info_reports_ecn[4]",
    "test_a_restored_ecn_flow_marks_its_new_data_ect0_and_tcp_info_reports_ecn[6]",
    "test_a_restored_ecn_flow_echoes_a_ce_mark_with_ece",
    "test_without_the_option_the_restored_flow_sends_not_ect_and_ignores_ce",
    "test_the_option_takes_ecn_and_ecn_seen_and_refuses_the_cwr_flags",
}
STOCK_ECN_REPAIR_TESTS = {
    "test_the_stock_kernel_ignores_the_ecn_repair_option_and_the_probe_says_so",
    "test_an_ecn_flow_is_refused_by_default_and_downgraded_to_not_ect_on_the_stock_kernel",
}


@pytest.fixture(scope="module")
def patched() -> Iterator[BuiltKernel]:
    yield build(Flavour.PATCHED)


@pytest.fixture(scope="module")
def stock() -> Iterator[BuiltKernel]:
    yield build(Flavour.STOCK)


def _guest_suite(kernel: BuiltKernel) -> GuestRun:
    patched = kernel.flavour is Flavour.PATCHED
    env = {"TCPCP_GUEST_FLAVOUR": kernel.flavour.value}
    if patched:
        env["TCPCP_GATE_BACKENDS"] = "patch"
    return boot(kernel.bzimage, GUEST_PYTEST + (f" {GATE_BEHAVIOUR}" if patched else ""),
                timeout=900, env=env)


def _passed(run: GuestRun) -> set[str]:
    """Names of the test cases the guest's junit report lists without failure or error."""
    root = ElementTree.fromstring(run.files.get("junit.xml", b"<testsuites/>"))
    return {case.get("name", "") for case in root.iter("testcase")
            if not any(child.tag in ("failure", "error", "skipped") for child in case)}


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
    assert counts["tests"] >= 15 + len(GATE_BEHAVIOUR_TESTS), counts
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    assert _passed(run) >= GATE_BEHAVIOUR_TESTS, GATE_BEHAVIOUR_TESTS - _passed(run)
    assert _passed(run) >= ECN_REPAIR_TESTS, ECN_REPAIR_TESTS - _passed(run)


def test_the_stock_kernel_reports_the_option_absent_and_the_gate_falls_back_to_bpf(
        stock: BuiltKernel) -> None:
    run = _guest_suite(stock)
    tail = "\n".join(run.serial_log.splitlines()[-60:])
    assert run.verdict.outcome is Outcome.PASSED, f"{run.verdict.detail}\n{tail}"
    counts = _counts(run)
    assert counts["tests"] == 5 + len(STOCK_ECN_REPAIR_TESTS), counts
    assert counts["failures"] == counts["errors"] == 0, counts
    assert {f"test_the_default_gate_on_the_stock_kernel_holds_acks_with_bpf[{g.value}]"
            for g in Guarding} <= _passed(run)
    assert _passed(run) >= STOCK_ECN_REPAIR_TESTS, STOCK_ECN_REPAIR_TESTS - _passed(run)


def test_a_failing_guest_command_is_reported_with_its_exit_status(stock: BuiltKernel) -> None:
    run = boot(stock.bzimage, "echo about-to-fail; exit 7", timeout=120)
    assert run.verdict.outcome is Outcome.FAILED and run.verdict.exit_code == 7
    assert "about-to-fail" in run.serial_log


def test_a_guest_whose_kernel_panics_fails_the_run_with_the_panic_named(
        stock: BuiltKernel) -> None:
    run = boot(stock.bzimage, "echo about-to-crash; echo c > /proc/sysrq-trigger; sleep 60",
               timeout=120)
    assert run.verdict.outcome is Outcome.KERNEL_PROBLEM, run.verdict
    assert "Kernel panic" in run.verdict.detail and "about-to-crash" in run.serial_log
    assert run.seconds < 100  # panic=-1 reboots at once and qemu's -no-reboot ends the run


def test_a_guest_that_hangs_is_stopped_and_reported_without_verdict(stock: BuiltKernel) -> None:
    run = boot(stock.bzimage, "echo hanging; sleep 600", timeout=20)
    assert run.verdict.outcome is Outcome.NO_VERDICT and "hang" in run.verdict.detail
    assert "hanging" in run.serial_log and run.seconds < 60
