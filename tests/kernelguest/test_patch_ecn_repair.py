"""TCPOPT_ECN_REPAIR (kernel/patches/0005) on the patched guest: a connection that negotiated ECN
(net.ipv4.tcp_ecn=1 on both ends of a veth pair at MTU 1500) is dumped with kernel/repair.py,
discarded silently and restored in the origin's namespace; the restored socket marks its new
data ECT(0) on the wire, reports TCPI_OPT_ECN and echoes a CE mark with ECE. Control: the same
restore without the option (probe answer forced to "cannot", policy DOWNGRADE) sends Not-ECT
and ignores CE, as every stock kernel does.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from kernel import repair
from kernel.sanity import Ecn, IciRejected
from ops.capture import ECE, Capture
from ops.kernel.guestnet import VethPair, run_in
from tests.kernelguest.ecn_flows import (
    ECT_0,
    TCP_ECN_DEMAND_CWR,
    TCP_ECN_QUEUE_CWR,
    TCPI_OPT_ECN,
    TCPI_OPT_ECN_SEEN,
    ack_of_ce_data,
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


@pytest.mark.parametrize("family", [4, 6])
def test_a_restored_ecn_flow_marks_its_new_data_ect0_and_tcp_info_reports_ecn(
        pair: VethPair, family: int) -> None:
    assert run_in(pair.origin_ns, repair.kernel_restores_ecn)
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        ici, client, server = ecn_flow_dumped(pair, family, cap)
        with client:
            mark = cap.mark()
            # the default policy (REFUSE) accepts it: this kernel restores ECN
            sock = restored(pair, ici, family, crash=server)
            with sock:
                assert options(sock) & TCPI_OPT_ECN, f"tcpi_options {options(sock):#x}"
                send_after_restore(sock, client, 6000)
                after = [s.ecn for s in data_after(cap, pair.origin_addr(family), mark)]
                assert after and set(after) == {ECT_0}, \
                    f"ECN field of the restored flow's data: {after}"


def test_a_restored_ecn_flow_echoes_a_ce_mark_with_ece(pair: VethPair) -> None:
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        ici, client, server = ecn_flow_dumped(pair, 4, cap)
        with client:
            sock = restored(pair, ici, 4, crash=server)
            with sock:
                send_after_restore(sock, client, 2000)
                ack = ack_of_ce_data(pair, ici, client, sock, cap, sent=2000)
                assert ack.flags & ECE, f"the ACK of CE-marked data: {ack}"
                assert options(sock) & TCPI_OPT_ECN_SEEN


def test_without_the_option_the_restored_flow_sends_not_ect_and_ignores_ce(
        pair: VethPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same kernel, restore() told the kernel cannot restore ECN."""
    monkeypatch.setattr(repair, "kernel_restores_ecn", lambda: False)
    with Capture(pair.peer_ns, "eth0", "tcp") as cap:
        ici, client, server = ecn_flow_dumped(pair, 4, cap)
        with client:
            with pytest.raises(IciRejected, match="ecn: expected a flow without ECN"):
                restored(pair, ici, 4)  # the default policy refuses, nothing created
            mark = cap.mark()
            sock = restored(pair, ici, 4, Ecn.DOWNGRADE, crash=server)
            with sock:
                assert not options(sock) & TCPI_OPT_ECN, f"tcpi_options {options(sock):#x}"
                send_after_restore(sock, client, 2000)
                after = [s.ecn for s in data_after(cap, pair.origin_addr(4), mark)]
                assert after and set(after) == {0}, \
                    f"ECN field of the downgraded flow's data: {after}"
                ack = ack_of_ce_data(pair, ici, client, sock, cap, sent=2000)
                assert not ack.flags & ECE, f"the ACK of CE-marked data: {ack}"


def test_the_option_takes_ecn_and_ecn_seen_and_refuses_the_cwr_flags(pair: VethPair) -> None:
    with repaired_socket(pair) as sock:  # closed in repair mode: silent
        assert not options(sock) & (TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN)
        set_ecn(sock, TCPI_OPT_ECN)
        assert options(sock) & (TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN) == TCPI_OPT_ECN
        set_ecn(sock, TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN)
        assert options(sock) & (TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN) == \
            TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN
        for bad in (TCPI_OPT_ECN_SEEN, TCPI_OPT_ECN | TCP_ECN_QUEUE_CWR,
                    TCPI_OPT_ECN | TCP_ECN_DEMAND_CWR, 0xFFFFFFFF):
            with pytest.raises(OSError) as caught:
                set_ecn(sock, bad)
            assert caught.value.errno == errno.EINVAL, bad
        set_ecn(sock, 0)
        assert not options(sock) & (TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN)
        sock.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, repair.REPAIR_OFF_NO_WP)
        with pytest.raises(OSError) as caught:  # only in repair mode, like the other options
            set_ecn(sock, TCPI_OPT_ECN)
        assert caught.value.errno == errno.EINVAL
        sock.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, repair.REPAIR_ON)
