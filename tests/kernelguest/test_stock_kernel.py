"""On the stock (unpatched) guest kernel the patch backend reports itself absent and the gate
falls back to bpf."""

from __future__ import annotations

import errno
import socket

import pytest

from kernel import patch_gate
from kernel.patch_gate import Backend, OptionAbsent, PatchGate


def test_the_stock_kernel_answers_enoprotoopt_for_tcp_commit_seq() -> None:
    with socket.socket() as s, pytest.raises(OSError) as caught:
        s.getsockopt(socket.IPPROTO_TCP, patch_gate.TCP_COMMIT_SEQ, 16)
    assert caught.value.errno == errno.ENOPROTOOPT


def test_the_gate_falls_back_to_bpf_when_the_option_is_absent() -> None:
    assert not patch_gate.commit_option_present()
    assert patch_gate.select_backend() is Backend.BPF
    assert patch_gate.select_backend("bpf") is Backend.BPF


def test_asking_for_the_patch_backend_on_a_stock_kernel_is_refused() -> None:
    with pytest.raises(OptionAbsent, match="ENOPROTOOPT"):
        patch_gate.select_backend("patch")
    with pytest.raises(OptionAbsent):
        PatchGate()
