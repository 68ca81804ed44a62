"""Pure parts of the guest-kernel tooling: the initramfs archive, the serial-log verdict, the
config check, and the patch backend's socket-option records."""

from __future__ import annotations

import stat
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kernel.patch_gate import AheadInfo, CommitInfo, refusal_reason
from ops.kernel.build import missing_options, touched_files, wanted_options
from ops.kernel.initramfs import INIT, Entry, newc_archive, read_newc
from ops.kernel.qemu import Outcome, job_script, read_verdict

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_./-", min_size=1, max_size=40)
u32 = st.integers(min_value=0, max_value=2**32 - 1)


@given(st.lists(st.tuples(names, st.binary(max_size=300)), max_size=8))
def test_a_newc_archive_reads_back_as_the_members_written(members: list[tuple[str, bytes]]
                                                          ) -> None:
    entries = [Entry(n, stat.S_IFREG | 0o644, d) for n, d in members]
    archive = newc_archive(entries)
    assert len(archive) % 4 == 0
    assert read_newc(archive) == entries


def test_the_init_prints_the_nonce_verdict_and_reboots() -> None:
    assert "TCPCP-VERDICT $nonce exit=$1" in INIT
    assert "reboot -f" in INIT


def test_a_verdict_line_with_the_runs_nonce_decides_the_outcome() -> None:
    log = "booting\nTCPCP-VERDICT abc exit=0 job-finished\n"
    assert read_verdict(log, "abc").outcome is Outcome.PASSED
    failed = read_verdict("TCPCP-VERDICT abc exit=3 job-finished\n", "abc")
    assert (failed.outcome, failed.exit_code) == (Outcome.FAILED, 3)


def test_a_verdict_line_of_another_run_is_no_verdict() -> None:
    assert read_verdict("TCPCP-VERDICT xyz exit=0\n", "abc").outcome is Outcome.NO_VERDICT


def test_a_panic_fails_the_run_even_after_a_passing_verdict() -> None:
    log = "TCPCP-VERDICT abc exit=0\n[ 1.0] Kernel panic - not syncing: Attempted to kill init\n"
    assert read_verdict(log, "abc").outcome is Outcome.KERNEL_PROBLEM


def test_a_timeout_without_verdict_is_reported_as_a_hang() -> None:
    verdict = read_verdict("[ 0.1] booting\n", "abc", timed_out=True)
    assert verdict.outcome is Outcome.NO_VERDICT and "hang" in verdict.detail


def test_the_job_script_exports_the_environment_and_enters_the_directory() -> None:
    script = job_script("pytest -q", Path("/work/main"), {"X": "a b"})
    assert "export X='a b'" in script and "cd /work/main || exit 126" in script
    assert script.rstrip().endswith("pytest -q")


def test_options_kconfig_dropped_are_reported_missing() -> None:
    fragment = "# c\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
    assert wanted_options(fragment) == {"CONFIG_A": "y", "CONFIG_B": "y"}
    assert missing_options(fragment, "CONFIG_A=y\n") == ["CONFIG_B=y (got unset)"]
    assert missing_options(fragment, "CONFIG_A=y\nCONFIG_B=y\n") == []


def test_the_config_fragment_asks_for_what_the_guest_needs() -> None:
    wanted = wanted_options(Path("ops/kernel/config").read_text())
    for option in ("CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS", "CONFIG_VIRTIO_PCI", "CONFIG_VETH",
                   "CONFIG_NET_NS", "CONFIG_PACKET", "CONFIG_IPV6", "CONFIG_FUTEX"):
        assert wanted.get(option) == "y"


def test_the_series_lists_the_patches_and_they_touch_tcp() -> None:
    patches = Path("kernel/patches")
    listed = (patches / "series").read_text().split()
    assert listed and all((patches / name).exists() for name in listed)
    touched = {f for name in listed for f in touched_files((patches / name).read_text())}
    assert {"net/ipv4/tcp_output.c", "net/ipv4/tcp_input.c", "net/ipv4/tcp.c"} <= touched


@given(u32, u32, u32, st.booleans())
def test_commit_info_round_trips(commit: int, rcv: int, copied: int, gated: bool) -> None:
    info = CommitInfo(commit, rcv, copied, gated)
    assert CommitInfo.unpack(info.pack()) == info


@given(u32, st.booleans())
def test_accept_ahead_info_unpacks(distance: int, armed: bool) -> None:
    import struct
    assert AheadInfo.unpack(struct.pack("=II", distance, int(armed))) == AheadInfo(distance,
                                                                                    armed)


def test_refusals_name_their_reason() -> None:
    import errno
    assert "backwards" in refusal_reason(errno.EINVAL)
    assert "beyond" in refusal_reason(errno.ERANGE)
    assert "EPERM" in refusal_reason(errno.EPERM)
