"""The one gate interface on the patched guest kernel: open_gate() picks the patch backend, and
the held-ACK scenario the host runs with bpf (tests/integration/test_gate_backend.py) passes
here with either backend, over a veth pair at MTU 1500."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import pytest

from kernel.gatebackend import GateUnavailable, open_gate
from kernel.patch_gate import Backend
from ops.kernel.guestnet import VethPair
from tests.kernelguest.held_acks import (
    Guarding,
    check_acks_held_until_committed,
    on_veth_pair,
)

_ports = count(5910)


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with VethPair() as p:
        yield p


def test_open_gate_picks_the_patch_backend_on_the_patched_kernel(pair: VethPair) -> None:
    with open_gate("eth0", netns=pair.origin_ns) as gate:
        assert gate.backend is Backend.PATCH
        assert gate.patch_gate is not None
        with pytest.raises(GateUnavailable, match="expected a bpf gate, got a patch one"):
            _ = gate.bpf_gate
    with open_gate("eth0", backend="bpf", netns=pair.origin_ns) as gate:
        assert gate.backend is Backend.BPF
        assert gate.bpf_gate.netns == pair.origin_ns


@pytest.mark.parametrize("backend", [None, "bpf"], ids=["default-patch", "bpf"])
@pytest.mark.parametrize("guarding", list(Guarding), ids=lambda g: g.value)
def test_a_gated_connection_is_acknowledged_to_the_peer_only_as_far_as_committed(
        pair: VethPair, backend: str | None, guarding: Guarding) -> None:
    port = next(_ports)
    with open_gate("eth0", backend=backend, netns=pair.origin_ns) as gate:
        assert gate.backend is (Backend.PATCH if backend is None else Backend.BPF)
        server, client, base = on_veth_pair(gate, guarding, pair, port)
        with server, client:
            check_acks_held_until_committed(gate, server, client, base)
