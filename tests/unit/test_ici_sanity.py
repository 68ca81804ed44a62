"""Tests of the pre-restore sanity checks: good ICIs pass, each broken invariant is named."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.ici import (
    Family,
    Ici,
    Identity,
    Params,
    TcpOption,
    TcpState,
    Timestamp,
    Window,
)
from kernel.sanity import RESTORABLE_STATES, Ecn, IciRejected, RestorePolicy, check
from kernel.seq import seq_add
from tests.unit.test_ici_codec import icis

POLICY = RestorePolicy.serving("10.77.9.1", "fd77:9::1")
ALL_OPTS = TcpOption.TIMESTAMPS | TcpOption.SACK | TcpOption.WSCALE


@st.composite
def sane_icis(draw: st.DrawFn) -> Ici:
    """ICIs as a live Linux connection produces them."""
    v6 = draw(st.booleans())
    family = Family.IPV6 if v6 else Family.IPV4
    local = ipaddress.ip_address("fd77:9::1" if v6 else "10.77.9.1").packed
    peer = ipaddress.ip_address("fd77:1::2" if v6 else "10.77.1.2").packed
    rcv_nxt = draw(st.integers(0, 2**32 - 1))
    rcv_wnd = draw(st.integers(0, 65535 << 7))
    snd_wnd = draw(st.integers(0, 65535 << 7))
    wscale = draw(st.integers(0, 14))
    return Ici(
        identity=Identity(family, local, draw(st.integers(1, 65535)), peer,
                          draw(st.integers(1, 65535))),
        state=TcpState.ESTABLISHED,
        params=Params(draw(st.integers(88, 65495)), wscale, wscale, ALL_OPTS),
        snd_una=draw(st.integers(0, 2**32 - 1)),
        rcv_nxt=rcv_nxt,
        window=Window(
            snd_wl1=seq_add(rcv_nxt, -draw(st.integers(0, 1 << 20))),
            snd_wnd=snd_wnd,
            max_window=snd_wnd + draw(st.integers(0, 1 << 16)),
            rcv_wnd=rcv_wnd,
            rcv_wup=seq_add(rcv_nxt, -draw(st.integers(0, rcv_wnd))),
        ),
        timestamp=Timestamp(draw(st.integers(0, 2**32 - 1)), 0),
        sent=draw(st.binary(max_size=100)),
        unsent=draw(st.binary(max_size=100)),
        received=draw(st.binary(max_size=100)),
    )


@given(sane_icis())
def test_an_ici_from_a_live_connection_passes(ici: Ici) -> None:
    check(ici, POLICY)


def _with(ici: Ici, **changes: object) -> Ici:
    groups: dict[str, Any] = {"params": ici.params, "window": ici.window,
                              "identity": ici.identity}
    top: dict[str, Any] = {}
    for key, value in changes.items():
        for gname, group in groups.items():
            if key in {f.name for f in dataclasses.fields(group)}:
                groups[gname] = dataclasses.replace(group, **{key: value})
                top[gname] = groups[gname]
                break
        else:
            top[key] = value
    return dataclasses.replace(ici, **top)


@given(sane_icis(), st.sampled_from(["snd_wscale", "rcv_wscale"]), st.integers(15, 255))
def test_a_window_scale_above_14_is_refused(ici: Ici, name: str, value: int) -> None:
    with pytest.raises(IciRejected,
                       match=f"window scale: {name}: expected at most 14, got {value}"):
        check(_with(ici, **{name: value}), POLICY)


@given(sane_icis(), st.integers(1, 1 << 20))
def test_max_window_below_snd_wnd_is_refused(ici: Ici, short: int) -> None:
    bad = _with(ici, snd_wnd=ici.window.max_window + short)
    with pytest.raises(IciRejected, match=rf"max_window: expected at least snd_wnd "
                       rf"\({bad.window.snd_wnd}\), got {bad.window.max_window}"):
        check(bad, POLICY)


@given(sane_icis(), st.integers(1, 1 << 30))
def test_rcv_wup_after_rcv_nxt_is_refused(ici: Ici, ahead: int) -> None:
    wup = seq_add(ici.rcv_nxt, ahead)
    with pytest.raises(IciRejected, match=rf"rcv_wup: expected at or before rcv_nxt "
                       rf"\({ici.rcv_nxt}\), got {wup}"):
        check(_with(ici, rcv_wup=wup), POLICY)


@given(sane_icis(), st.integers(1, 1 << 29))
def test_snd_wl1_beyond_the_receive_window_is_refused(ici: Ici, ahead: int) -> None:
    wl1 = seq_add(ici.rcv_nxt, ici.window.rcv_wnd + ahead)
    with pytest.raises(IciRejected,
                       match=rf"snd_wl1: expected at or before rcv_nxt \+ rcv_wnd .*, got {wl1}"):
        check(_with(ici, snd_wl1=wl1), POLICY)


@given(sane_icis(), st.sampled_from([0, 87, 65496, 65535]))
def test_an_mss_outside_the_kernel_range_is_refused(ici: Ici, mss: int) -> None:
    with pytest.raises(IciRejected, match=f"mss: expected 88..65495, got {mss}"):
        check(_with(ici, mss_clamp=mss), POLICY)


@given(sane_icis())
def test_a_local_address_the_host_does_not_serve_is_refused(ici: Ici) -> None:
    foreign = b"\x0a\x00\x00\x63" if ici.identity.family is Family.IPV4 else b"\xfe" * 16
    with pytest.raises(IciRejected, match=r"is not an address this host serves \(expected one of: "
                       r"10\.77\.9\.1, fd77:9::1\)"):
        check(_with(ici, local_addr=foreign), POLICY)


@given(sane_icis(), st.sampled_from(sorted(set(TcpState) - RESTORABLE_STATES)))
def test_an_unsupported_state_is_refused(ici: Ici, state: TcpState) -> None:
    allowed = ", ".join(sorted(s.name for s in RESTORABLE_STATES))
    with pytest.raises(IciRejected, match=f"expected one of {allowed}, got {state.name}"):
        check(_with(ici, state=state), POLICY)


def test_the_default_policy_restores_established_and_every_half_closed_state() -> None:
    assert POLICY.states == {TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT1,
                             TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.LAST_ACK}


@given(sane_icis())
def test_fin_bookkeeping_that_no_kernel_produces_is_refused(ici: Ici) -> None:
    base = dataclasses.replace(ici, sent=b"", unsent=b"")
    with pytest.raises(IciRejected, match="fin: fin_sent: expected False in CLOSE_WAIT"):
        check(dataclasses.replace(base, state=TcpState.CLOSE_WAIT, fin_sent=True), POLICY)
    with pytest.raises(IciRejected, match="fin: fin_sent: expected True in FIN_WAIT2"):
        check(dataclasses.replace(base, state=TcpState.FIN_WAIT2), POLICY)
    with pytest.raises(IciRejected, match="fin: send queue: expected empty in FIN_WAIT2"):
        check(dataclasses.replace(base, state=TcpState.FIN_WAIT2, fin_sent=True, sent=b"x"),
              POLICY)
    with pytest.raises(IciRejected, match="fin: unsent: expected empty after a transmitted"):
        check(dataclasses.replace(base, state=TcpState.LAST_ACK, fin_sent=True, unsent=b"x"),
              POLICY)
    check(dataclasses.replace(base, state=TcpState.FIN_WAIT2, fin_sent=True), POLICY)
    check(dataclasses.replace(base, state=TcpState.FIN_WAIT1, unsent=b"x"), POLICY)


@given(sane_icis())
def test_an_ecn_flow_is_refused_by_default_and_downgraded_only_when_asked(ici: Ici) -> None:
    ecn = _with(ici, params=dataclasses.replace(
        ici.params, options=ici.params.options | TcpOption.ECN))
    with pytest.raises(IciRejected, match="ecn: expected a flow without ECN"):
        check(ecn, POLICY)
    with pytest.raises(IciRejected, match="ecn: expected a flow without ECN"):
        check(ecn, POLICY, kernel_restores_ecn=False)
    check(ecn, dataclasses.replace(POLICY, ecn=Ecn.DOWNGRADE))


@given(sane_icis(), st.sampled_from(list(Ecn)))
def test_an_ecn_flow_is_accepted_under_either_policy_where_the_kernel_restores_ecn(
        ici: Ici, policy_ecn: Ecn) -> None:
    ecn = _with(ici, params=dataclasses.replace(
        ici.params, options=ici.params.options | TcpOption.ECN))
    check(ecn, dataclasses.replace(POLICY, ecn=policy_ecn), kernel_restores_ecn=True)


@given(sane_icis())
def test_queues_beyond_the_configured_limits_are_refused(ici: Ici) -> None:
    small = dataclasses.replace(POLICY, max_send_queue=10, max_recv_queue=10)
    with pytest.raises(IciRejected, match="send queue: expected at most 10 bytes, got 11"):
        check(dataclasses.replace(ici, sent=b"x" * 5, unsent=b"y" * 6, received=b""), small)
    with pytest.raises(IciRejected, match="receive queue: expected at most 10 bytes, got 11"):
        check(dataclasses.replace(ici, sent=b"", unsent=b"", received=b"z" * 11), small)


@given(sane_icis())
def test_a_scale_without_negotiated_window_scaling_is_refused(ici: Ici) -> None:
    bad = _with(ici, options=TcpOption.SACK, snd_wscale=3)
    with pytest.raises(IciRejected,
                       match="snd_wscale: expected 0 as window scaling was not negotiated, got 3"):
        check(bad, POLICY)


@given(icis)
def test_any_ici_is_either_accepted_or_rejected_with_a_reason(ici: Ici) -> None:
    try:
        check(ici, POLICY)
    except IciRejected as exc:
        assert exc.check and "expected" in str(exc)
