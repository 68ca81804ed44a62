"""The restore planner against a generated truth: a connection whose peer stands somewhere relative
to the checkpoint (behind it, at it, ahead by k bytes on either side, across 2**32), with and
without timestamps and FINs. The checkpoint ICI and the probe answer are built from the truth,
the plan is checked against it, and every impossible answer is refused with its values."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kernel.ici import (
    OUR_FIN_STATES,
    PEER_FIN_STATES,
    Family,
    Ici,
    Identity,
    Params,
    TcpOption,
    TcpState,
    Timestamp,
    Window,
    clock_value,
)
from kernel.quarantine import Observation
from kernel.sanity import RESTORABLE_STATES, RestorePolicy, check
from kernel.seq import after, before, seq_add, seq_diff
from resurrector.planner import TH_ACK, TH_RST, Output, PeerAnswer, PlanRefused, plan_restore

POLICY = RestorePolicy.serving("10.77.9.1")
SEQS = st.one_of(st.integers(2**32 - 3000, 2**32 - 1), st.integers(0, 2**32 - 1))


@dataclasses.dataclass(frozen=True)
class Truth:
    """Our whole outbound data stream from s0, the checkpoint's share of it (acked at the
    checkpoint: [:una]; queued: [una:end]), the peer's position p in it (p = len + 1 once our
    FIN is acked), and the inbound side: the committed rcv_nxt and k bytes the peer sent beyond."""

    ici: Ici
    stream: bytes
    una: int
    end: int
    p: int
    rcv_nxt: int
    k: int
    output: Output
    answer: Observation
    now_ms: int
    margin_ms: int


@st.composite
def truths(draw: st.DrawFn) -> Truth:
    state = draw(st.sampled_from(sorted(RESTORABLE_STATES)))
    our_fin, peer_fin = state in OUR_FIN_STATES, state in PEER_FIN_STATES
    output = draw(st.sampled_from(Output))
    s0, una = draw(SEQS), draw(st.integers(0, 3000))
    q = 0 if state is TcpState.FIN_WAIT2 else draw(st.integers(0, 300))
    extra = 0 if our_fin or output is Output.LOGGED else draw(st.integers(0, 300))
    stream = draw(st.binary(min_size=una + q + extra, max_size=una + q + extra))
    fin_sent = state is TcpState.FIN_WAIT2 or (our_fin and draw(st.booleans()))
    split = q if fin_sent else draw(st.integers(0, q))
    top = una + q + extra + int(our_fin)  # the FIN counts once acked
    low = una + int(state is TcpState.FIN_WAIT2)  # there the checkpoint already counts it
    edges = sorted({x for x in (low, una + q, top) if x >= low})  # behind, at, ahead
    p = draw(st.sampled_from(edges) | st.integers(low, top))
    rcv_nxt, k = draw(SEQS), 0 if peer_fin else draw(st.integers(0, 1 << 18))
    wscale = draw(st.integers(0, 14))
    ts = draw(st.booleans())
    opts = (TcpOption.TIMESTAMPS if ts else TcpOption(0)) | (
        TcpOption.WSCALE if wscale else TcpOption(0))
    usec = draw(st.booleans())
    tsval0 = clock_value(draw(SEQS), usec)
    read_at = draw(st.integers(0, 2**40))
    now, margin = read_at + draw(st.integers(0, 10**6)), draw(st.integers(0, 1000))
    rcv_wnd = draw(st.integers(0, 1 << 20))
    ici = Ici(
        identity=Identity(Family.IPV4, ipaddress.ip_address("10.77.9.1").packed, 80,
                          ipaddress.ip_address("10.77.1.2").packed, 40000),
        state=state, params=Params(1460, wscale, wscale, opts),
        snd_una=seq_add(s0, una + int(state is TcpState.FIN_WAIT2)), rcv_nxt=rcv_nxt,
        window=Window(snd_wl1=seq_add(rcv_nxt, -draw(st.integers(0, 1 << 16))),
                      snd_wnd=1000, max_window=draw(st.integers(1000, 1 << 20)), rcv_wnd=rcv_wnd,
                      rcv_wup=seq_add(rcv_nxt, draw(st.integers(-(1 << 16), 1 << 16)))),
        timestamp=Timestamp(tsval0, read_at),
        sent=stream[una:una + split], unsent=stream[una + split:una + q],
        received=draw(st.binary(max_size=50)), fin_sent=fin_sent)
    peer_nxt = seq_add(rcv_nxt, k)
    answer = Observation(
        seq=peer_nxt, end_seq=peer_nxt, ack=seq_add(s0, p), window=draw(st.integers(0, 65535)),
        tsval=draw(SEQS) if ts else None,
        tsecr=seq_add(tsval0, draw(st.integers(-(10**6), 10**7))) if ts else None,
        tcp_flags=TH_ACK, packets=1)
    return Truth(ici, stream, una, una + q, p, rcv_nxt, k, output, answer, now, margin)


def _closed(t: Truth) -> bool:
    """The peer acknowledged our FIN after its own: nothing is left to restore."""
    return t.p > len(t.stream) and t.ici.state in (TcpState.CLOSING, TcpState.LAST_ACK)


@given(truths())
def test_peer_gets_every_outbound_byte_exactly_once_or_the_plan_is_refused(t: Truth) -> None:
    """What the peer has + what the plan resends + what the application regenerates from its
    resume point (checkpoint end + peer_ahead) is exactly the stream, in every case."""
    fin_acked = t.p > len(t.stream)
    if _closed(t):
        closed = f"ack {t.answer.ack} = write_seq.*{t.ici.state.name}"
        with pytest.raises(PlanRefused, match=closed):
            plan_restore(t.ici, t.answer, output=t.output, now_ms=0, margin_ms=0)
        return
    plan = plan_restore(t.ici, t.answer, output=t.output, now_ms=t.now_ms, margin_ms=t.margin_ms)
    new = plan.ici
    peer_has = t.stream[:min(t.p, len(t.stream))]  # data: an acked FIN is no byte
    assert peer_has + new.unsent + t.stream[t.end + plan.peer_ahead:] == t.stream
    assert plan.peer_ahead == len(peer_has) - min(len(peer_has), t.end)
    assert plan.acked == min(t.p, t.end) - t.una
    assert new.sent == b"" and new.snd_una == t.answer.ack and new.snd_nxt == new.snd_una
    assert (new.state is TcpState.FIN_WAIT2) == (fin_acked or t.ici.state is TcpState.FIN_WAIT2)
    assert new.fin_sent == (new.state is TcpState.FIN_WAIT2)
    assert new.our_fin == t.ici.our_fin and new.peer_fin == t.ici.peer_fin
    assert new.write_seq == (t.ici.write_seq if plan.peer_ahead == 0 else t.answer.ack)
    if t.output is Output.LOGGED:
        assert plan.peer_ahead == 0


@given(truths())
def test_receive_side_starts_at_the_committed_sequence_and_passes_the_sanity_check(
    t: Truth,
) -> None:
    assume(not _closed(t))
    plan = plan_restore(t.ici, t.answer, output=t.output, now_ms=t.now_ms, margin_ms=t.margin_ms)
    new, old = plan.ici, t.ici.window
    assert new.rcv_nxt == t.rcv_nxt and new.received == t.ici.received and plan.peer_holds == t.k
    edge = seq_add(new.window.rcv_wup, new.window.rcv_wnd)
    assert new.window.rcv_wup == t.rcv_nxt
    assert not before(edge, seq_add(old.rcv_wup, old.rcv_wnd))  # the right edge never moves back
    assert not before(edge, t.answer.end_seq)
    assert new.window.snd_wnd == t.answer.window << t.ici.params.snd_wscale
    assert new.window.snd_wl1 == t.answer.seq and new.window.max_window >= new.window.snd_wnd
    check(new, POLICY)


@given(truths())
def test_tsval_is_never_below_the_estimate_nor_the_peers_tsecr_plus_one(t: Truth) -> None:
    assume(not _closed(t))
    plan = plan_restore(t.ici, t.answer, output=t.output, now_ms=t.now_ms, margin_ms=t.margin_ms)
    ts = plan.ici.timestamp
    if t.answer.tsecr is None:
        assert ts == t.ici.timestamp and plan.ts_recent is None
        return
    estimate = t.ici.timestamp.estimate(t.now_ms, t.margin_ms)
    floor = seq_add(t.answer.tsecr, 1)
    assert not before(ts.tsval, estimate) and not before(ts.tsval, floor)
    assert ts.tsval in (estimate, clock_value(floor, ts.usec))
    assert ts.usec == t.ici.timestamp.usec  # same unit and mode
    assert ts.estimate(plan.now_ms, 0) == ts.tsval  # restore() sends exactly the plan's value
    assert not before(ts.estimate(t.now_ms + 5, t.margin_ms), ts.tsval)  # ... or later
    assert plan.ts_recent == t.answer.tsval


def _answer(t: Truth, **changes: Any) -> PeerAnswer:
    return dataclasses.replace(t.answer, **changes)


@given(truths(), st.integers(1, 2**31 - 1))
def test_a_peer_ack_before_the_checkpoints_snd_una_is_refused(t: Truth, back: int) -> None:
    ack = seq_add(t.ici.snd_una, -back)
    with pytest.raises(PlanRefused, match=f"snd_una {t.ici.snd_una}, got {ack}"):
        plan_restore(t.ici, _answer(t, ack=ack), output=t.output, now_ms=0, margin_ms=0)


@given(truths(), st.integers(1, 2**31 - 1))
def test_a_peer_seq_behind_the_committed_rcv_nxt_is_refused(t: Truth, back: int) -> None:
    seq = seq_add(t.rcv_nxt, -back)
    assume(not _closed(t))
    with pytest.raises(PlanRefused, match=f"rcv_nxt {t.rcv_nxt}, got {seq}"):
        plan_restore(t.ici, _answer(t, seq=seq, end_seq=seq), output=t.output, now_ms=0,
                     margin_ms=0)


@given(truths(), st.integers(1, 2**30))  # within half the space of snd_una, too
def test_a_peer_ahead_of_logged_output_or_of_our_fin_is_refused(t: Truth, k: int) -> None:
    ack = seq_add(t.ici.write_seq, k)
    assume(t.output is Output.LOGGED or t.ici.our_fin)
    with pytest.raises(PlanRefused, match=f"write_seq {t.ici.write_seq}"):
        plan_restore(t.ici, _answer(t, ack=ack), output=t.output, now_ms=0, margin_ms=0)


@given(truths())
def test_a_reset_or_a_missing_timestamp_is_refused(t: Truth) -> None:
    with pytest.raises(PlanRefused, match="flags 0x14"):
        plan_restore(t.ici, _answer(t, tcp_flags=TH_RST | TH_ACK), output=t.output, now_ms=0,
                     margin_ms=0)
    assume(t.answer.tsval is not None)
    assume(not _closed(t))
    with pytest.raises(PlanRefused, match="TSval None, TSecr None"):
        plan_restore(t.ici, _answer(t, tsval=None, tsecr=None), output=t.output, now_ms=0,
                     margin_ms=0)


def test_a_peer_ahead_of_regenerable_output_across_2_32_is_told_how_far() -> None:
    ici = Ici(Identity(Family.IPV4, bytes([10, 77, 9, 1]), 80, bytes([10, 77, 1, 2]), 4000),
              TcpState.ESTABLISHED, Params(1460, 0, 0, TcpOption(0)), 2**32 - 10, 5,
              Window(5, 100, 100, 1000, 5), Timestamp(0, 0), sent=b"a" * 4, unsent=b"b" * 4)
    answer = Observation(seq=5, end_seq=5, ack=20, window=500, tsval=None, tsecr=None,
                         tcp_flags=TH_ACK, packets=1)
    plan = plan_restore(ici, answer, output=Output.REGENERABLE, now_ms=0, margin_ms=0)
    assert (plan.peer_ahead, plan.acked, plan.ici.unsent, plan.ici.snd_una) == (22, 8, b"", 20)
    assert after(plan.ici.snd_una, ici.write_seq) and seq_diff(20, ici.write_seq) == 22
