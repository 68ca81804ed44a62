"""Attaching and detaching the gate and the quarantine with pyroute2: filters appear where asked,
vanish on exit (also when the block fails), a clsact qdisc someone else made is left alone."""

from __future__ import annotations

import pytest
from pyroute2 import IPRoute

from kernel.bpf.layout import Flow
from kernel.gate import AckGate, GateError
from kernel.quarantine import Quarantine, QuarantineError
from kernel.tcfilter import Direction
from ops.lab import Lab


def _bpf_filters(lab: Lab, host: str) -> dict[str, list[str]]:
    with IPRoute(netns=lab.netns(host)) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        qdiscs = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(idx)]
        out: dict[str, list[str]] = {"clsact": [k for k in qdiscs if k == "clsact"]}
        if out["clsact"]:
            for d in Direction:
                out[d.name] = [f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME")
                               for f in ipr.get_filters(index=idx, parent=d.value)
                               if f.get_attr("TCA_KIND") == "bpf" and f.get_attr("TCA_OPTIONS")]
        return out


def test_gate_and_quarantine_attach_on_their_side_and_leave_nothing_behind(lab: Lab) -> None:
    assert _bpf_filters(lab, "origin") == {"clsact": []}
    with AckGate("eth0", netns=lab.netns("origin")), \
            Quarantine("eth0", netns=lab.netns("origin")):
        seen = _bpf_filters(lab, "origin")
        assert seen["clsact"] == ["clsact"]
        assert "tcpcp_gate" in " ".join(seen["EGRESS"])
        assert "tcpcp_quarantine" in " ".join(seen["INGRESS"])
    assert _bpf_filters(lab, "origin") == {"clsact": []}


def test_gate_detaches_when_the_block_raises(lab: Lab) -> None:
    with pytest.raises(RuntimeError, match="boom"), \
            AckGate("eth0", netns=lab.netns("origin")) as gate:
        gate.guard(Flow.of(("10.77.9.1", 80), ("10.77.1.2", 4000)), 1, 7)
        raise RuntimeError("boom")
    assert _bpf_filters(lab, "origin") == {"clsact": []}
    with pytest.raises(GateError, match="closed"):
        gate.guard(Flow.of(("10.77.9.1", 80), ("10.77.1.2", 4000)), 1, 7)


def test_detach_keeps_a_clsact_qdisc_it_did_not_create(lab: Lab) -> None:
    with IPRoute(netns=lab.netns("standby")) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.tc("add", "clsact", idx)
    try:
        with Quarantine("eth0", netns=lab.netns("standby")):
            pass
        assert _bpf_filters(lab, "standby") == {"clsact": ["clsact"], "INGRESS": [],
                                                "EGRESS": []}
    finally:
        with IPRoute(netns=lab.netns("standby")) as ipr:
            ipr.tc("del", "clsact", ipr.link_lookup(ifname="eth0")[0])


def test_errors_say_what_was_expected(lab: Lab) -> None:
    flow = Flow.of(("10.77.9.1", 80), ("10.77.1.2", 4001))
    with AckGate("eth0", netns=lab.netns("origin")) as gate:
        with pytest.raises(GateError, match="expected a guarded flow"):
            gate.commit(flow, 5)
        with pytest.raises(GateError, match=r"rcv_wscale must be 0\.\.14, got 15"):
            gate.guard(flow, 1, 15)
        gate.guard(flow, 100, 7)
        assert gate.counters(flow).packets == 0
        assert not gate.commit(flow, 90)  # behind the committed sequence: nothing moves
        cfg = gate.config(flow)
        assert cfg is not None and cfg.committed_seq == 100
    with Quarantine("eth0", netns=lab.netns("standby")) as q, \
            pytest.raises(QuarantineError, match=r"expected flow .* in quarantine"):
        q.observed(flow)
