"""The one gate interface on the host (lab, stock kernel): open_gate() picks the bpf backend,
asking for patch is refused with the absent-option error, and a connection gated either from
its SYN-ACK or mid-connection has its bytes acknowledged to the peer only as far as committed
(the same scenario the patched guest runs, tests/kernelguest/test_patch_gate_backend.py)."""

from __future__ import annotations

import socket
from itertools import count

import pytest

from kernel.gatebackend import GateUnavailable, open_gate
from kernel.patch_gate import Backend, OptionAbsent, commit_option_present
from ops import gatelab as G
from ops.lab import Lab
from tests.kernelguest.held_acks import (
    Guarding,
    check_acks_held_until_committed,
    listen_and_connect,
)

_ports = count(5910)


def test_the_host_kernel_lacks_the_option_so_open_gate_picks_bpf(lab: Lab) -> None:
    assert not commit_option_present()
    with open_gate("eth0", netns=lab.netns("origin")) as gate:
        assert gate.backend is Backend.BPF
        assert gate.bpf_gate.netns == lab.netns("origin")
        with pytest.raises(GateUnavailable, match="expected a patch gate, got a bpf one"):
            _ = gate.patch_gate
    with pytest.raises(GateUnavailable, match="closed"):
        _ = gate.bpf_gate


def test_asking_for_the_patch_backend_on_the_stock_kernel_is_refused(lab: Lab) -> None:
    with pytest.raises(OptionAbsent, match="ENOPROTOOPT"):
        open_gate("eth0", backend="patch", netns=lab.netns("origin"))


@pytest.mark.parametrize("guarding", list(Guarding), ids=lambda g: g.value)
def test_a_gated_connection_is_acknowledged_to_the_peer_only_as_far_as_committed(
        lab: Lab, guarding: Guarding) -> None:
    port = next(_ports)
    with open_gate("eth0", netns=lab.netns("origin")) as gate:
        assert gate.backend is Backend.BPF
        server, client, base = listen_and_connect(
            gate, guarding,
            lambda: lab.call("origin", G.listener, 4, port),
            lambda: lab.call("peer", socket.create_connection, (lab.service(4), port), 10))
        with server, client:
            check_acks_held_until_committed(gate, server, client, base)
