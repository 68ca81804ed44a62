"""On the stock (unpatched) guest kernel the patch backend reports itself absent and the gate
falls back to bpf: open_gate() with no backend named holds a connection's ACKs with the eBPF
gate, over a veth pair at MTU 1500."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from kernel import patch_gate
from kernel.gatebackend import open_gate
from kernel.patch_gate import Backend, OptionAbsent, PatchGate
from ops.kernel.guestnet import VethPair
from tests.kernelguest.held_acks import (
    Guarding,
    check_acks_held_until_committed,
    on_veth_pair,
)

PORT = 5930


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with VethPair() as p:
        yield p


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


@pytest.mark.parametrize("guarding", list(Guarding), ids=lambda g: g.value)
def test_the_default_gate_on_the_stock_kernel_holds_acks_with_bpf(pair: VethPair,
                                                                   guarding: Guarding) -> None:
    with open_gate("eth0", netns=pair.origin_ns) as gate:
        assert gate.backend is Backend.BPF
        server, client, base = on_veth_pair(gate, guarding, pair, PORT)
        with server, client:
            check_acks_held_until_committed(gate, server, client, base)
