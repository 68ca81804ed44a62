"""On the stock guest kernel TCPOPT_ECN_REPAIR is an unknown TCP_REPAIR_OPTIONS code, accepted
and ignored: kernel.repair's probe answers that the kernel cannot restore ECN, the default policy
refuses a flow that negotiated ECN before any socket exists, and DOWNGRADE restores it Not-ECT
(the behaviour without kernel/patches/0005, unchanged)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kernel import repair
from kernel.sanity import Ecn, IciRejected
from ops.capture import Capture
from ops.kernel.guestnet import VethPair, run_in
from tests.kernelguest.ecn_flows import (
    TCPI_OPT_ECN,
    data_after,
    ecn_flow_dumped,
    ecn_pair,
    options,
    repaired_socket,
    restored,
    send_after_restore,
    set_ecn,
)


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with ecn_pair() as p:
        yield p


def test_the_stock_kernel_ignores_the_ecn_repair_option_and_the_probe_says_so(
        pair: VethPair) -> None:
    with repaired_socket(pair) as sock:  # closed in repair mode: silent
        set_ecn(sock, TCPI_OPT_ECN)  # no error: an unknown code is skipped
        set_ecn(sock, 0xFFFFFFFF)
        assert not options(sock) & TCPI_OPT_ECN
    assert not run_in(pair.origin_ns, repair.kernel_restores_ecn)


def test_an_ecn_flow_is_refused_by_default_and_downgraded_to_not_ect_on_the_stock_kernel(
        pair: VethPair) -> None:
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        ici, client, server = ecn_flow_dumped(pair, 4, cap)
        with client:
            with pytest.raises(IciRejected, match="ecn: expected a flow without ECN"):
                restored(pair, ici, 4)
            mark = cap.mark()
            sock = restored(pair, ici, 4, Ecn.DOWNGRADE, crash=server)
            with sock:
                assert not options(sock) & TCPI_OPT_ECN, f"tcpi_options {options(sock):#x}"
                send_after_restore(sock, client, 2000)
                after = [s.ecn for s in data_after(cap, pair.origin_addr(4), mark)]
                assert after and set(after) == {0}, f"ECN field of the restored data: {after}"
