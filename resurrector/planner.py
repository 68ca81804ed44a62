"""The restore planner: checkpoint + the peer's answer to our probe -> the exact state to restore.

Pure: no I/O (DESIGN.md section 6, step 4). Input: the checkpoint's ICI as the store gave it back
(its rcv_nxt is the committed receive sequence: the ACK gate never let the peer see an ack beyond
it), the peer's answer to the 1-byte out-of-window probe (kernel.quarantine.Observation fits
PeerAnswer), which output contract the application keeps, and the wall clock. Output: a
RestorePlan whose ICI goes to kernel.repair.restore as it is, or PlanRefused naming the values.

Send side. snd_una = the peer's ack. Queue bytes the peer acknowledged are dropped; the rest go in
as *unsent*, none as sent, so activate() writes them after repair-off and they leave at once
(DESIGN.md, "retransmit the last segment" without an RTO). A peer ack beyond the checkpoint's
write_seq (the origin wrote more after the checkpoint) is `peer_ahead`: the queue is empty and the
application regenerates from there; with logged output that cannot happen and is refused.
Our FIN: acknowledged in FIN_WAIT1 -> FIN_WAIT2 (fin_sent, snd_una counts it); acknowledged in
CLOSING or LAST_ACK the connection is over on both sides (TIME_WAIT/CLOSED cannot be restored):
refused. Not acknowledged, it is planned as never sent and follows the unsent bytes at once.
A regenerable application that also closed after the checkpoint cannot be told apart from one
byte more of output (the ack counts the FIN): it must know its stream's length.

Receive side. rcv_nxt stays the committed sequence, and the checkpoint's receive queue (`received`,
bytes before rcv_nxt the application had not read) stays as it is: those bytes are acknowledged
and held by the store, the peer will never send them again, so dropping them would lose them.
The peer may be ahead of rcv_nxt (bytes we never committed, which it still holds and resends);
behind it is impossible (we would claim bytes it never sent) and refused.

Window. snd_wnd is the answer's window << snd_wscale, snd_wl1 the answer's seq, max_window at
least snd_wnd. rcv_wup = rcv_nxt, and the right edge is never moved back from what the peer was
told (the checkpoint's rcv_wup + rcv_wnd), nor left short of what it has sent.

Timestamps. TSval = the later (mod 2**32) of the checkpoint's estimate and the peer's TSecr + 1,
in the clock's unit and mode. The plan's ICI carries it as Timestamp(tsval, now_ms): restore()
with any now_ms >= the plan's and any margin >= 0 sends at least that. What we echo (ts_recent)
cannot be set by TCP_REPAIR: the ICI has no field for it and restore() leaves it 0 ("no echo")
until the peer's next segment sets it; the plan keeps the answer's TSval as `ts_recent` for the
record only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Protocol

from kernel.ici import Ici, TcpOption, TcpState, Timestamp, Window, clock_value
from kernel.sanity import MAX_WINDOW
from kernel.seq import after, before, seq_add, seq_diff

TH_RST, TH_ACK = 0x04, 0x10


class PlanRefused(Exception):
    """The connection cannot be restored safely; `check` names the rule, the message the values."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"restore plan refused by {check}: {reason}")
        self.check = check


class Output(enum.Enum):
    """The application's outbound contract (DESIGN.md section 5)."""

    REGENERABLE = "regenerable"  # the peer may be ahead: the application skips what it has
    LOGGED = "logged"            # every byte sent was checkpointed first: never ahead


class PeerAnswer(Protocol):
    """The peer's answer to the probe, as the quarantine records it (window unscaled)."""

    @property
    def seq(self) -> int: ...
    @property
    def end_seq(self) -> int: ...
    @property
    def ack(self) -> int: ...
    @property
    def window(self) -> int: ...
    @property
    def tsval(self) -> int | None: ...
    @property
    def tsecr(self) -> int | None: ...
    @property
    def tcp_flags(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """What to restore and what to tell the application.

    ici: for kernel.repair.restore (with now_ms >= now_ms here). acked: bytes of the checkpoint's
    send queue the peer already had (dropped). peer_ahead: outbound bytes the peer has beyond the
    checkpoint's send stream, for a regenerable application to skip. peer_holds: sequence space
    (bytes, and its FIN) the peer has sent beyond the committed sequence and will resend.
    ts_recent: the peer's TSval, not restorable (see the module's docstring)."""

    ici: Ici
    acked: int
    peer_ahead: int
    peer_holds: int
    ts_recent: int | None
    now_ms: int


_FIN_ACKED = {TcpState.FIN_WAIT1: TcpState.FIN_WAIT2, TcpState.FIN_WAIT2: TcpState.FIN_WAIT2}


def plan_restore(ici: Ici, answer: PeerAnswer, *, output: Output, now_ms: int,
                 margin_ms: int) -> RestorePlan:
    """The restore plan for checkpoint `ici` given the peer's `answer`; PlanRefused if unsafe."""
    if answer.tcp_flags & TH_RST or not answer.tcp_flags & TH_ACK:
        raise PlanRefused("answer", f"expected an ACK from the peer, got flags "
                          f"{answer.tcp_flags:#04x} (RST: the peer no longer knows the connection)")
    state, fin_sent, ack = ici.state, False, answer.ack
    queue = ici.sent + ici.unsent
    write_seq, acked, ahead = ici.write_seq, 0, 0
    if before(ack, ici.snd_una):
        raise PlanRefused("peer ack", f"expected at or after the checkpoint's snd_una "
                          f"{ici.snd_una}, got {ack}: a peer never takes back an acknowledgement")
    if after(ack, write_seq):
        ahead = seq_diff(ack, write_seq)
        if ici.our_fin:
            raise PlanRefused("peer ack", f"expected at most write_seq {write_seq} (our FIN in "
                              f"{state.name} ends the stream), got {ack}")
        if output is Output.LOGGED:
            raise PlanRefused("peer ack", f"peer acknowledged {ack}, {ahead} bytes beyond the "
                              f"checkpoint's write_seq {write_seq}, with logged output (expected "
                              f"never beyond)")
        acked, queue = len(queue), b""
    elif ici.our_fin and ack == write_seq:
        if state not in _FIN_ACKED:
            raise PlanRefused("closed", f"peer acknowledged our FIN (ack {ack} = write_seq) in "
                              f"{state.name}: closed on both sides, nothing to restore")
        state, fin_sent, acked, queue = _FIN_ACKED[state], True, len(queue), b""
    else:
        acked = seq_diff(ack, ici.snd_queue_seq)
        queue = queue[acked:]
    peer_nxt = answer.end_seq
    if before(peer_nxt, ici.rcv_nxt):
        raise PlanRefused("peer seq", f"expected the peer's snd_nxt at or after the committed "
                          f"rcv_nxt {ici.rcv_nxt}, got {peer_nxt}: we would claim bytes it never "
                          f"sent")
    new = replace(ici, state=state, snd_una=ack, sent=b"", unsent=queue, fin_sent=fin_sent,
                  window=_window(ici, answer, peer_nxt),
                  timestamp=_timestamp(ici, answer, now_ms, margin_ms))
    ts_recent = answer.tsval if TcpOption.TIMESTAMPS in ici.params.options else None
    return RestorePlan(new, acked, ahead, seq_diff(peer_nxt, ici.rcv_nxt), ts_recent, now_ms)


def _window(ici: Ici, answer: PeerAnswer, peer_nxt: int) -> Window:
    """The five repair-window fields from the answer, the right edge never moved back."""
    w, rcv_nxt = ici.window, ici.rcv_nxt
    edge = seq_add(w.rcv_wup, w.rcv_wnd)
    for candidate in (peer_nxt, rcv_nxt):
        if after(candidate, edge):
            edge = candidate
    rcv_wnd = seq_diff(edge, rcv_nxt)
    if rcv_wnd > MAX_WINDOW:
        raise PlanRefused("window", f"expected the right edge at most {MAX_WINDOW} past rcv_nxt "
                          f"{rcv_nxt}, got {edge} (checkpoint {w.rcv_wup} + {w.rcv_wnd}, peer "
                          f"snd_nxt {peer_nxt})")
    snd_wnd = answer.window << ici.params.snd_wscale
    if snd_wnd > MAX_WINDOW:
        raise PlanRefused("window", f"expected the peer's window {answer.window} << snd_wscale "
                          f"{ici.params.snd_wscale} at most {MAX_WINDOW}, got {snd_wnd}")
    return Window(snd_wl1=answer.seq, snd_wnd=snd_wnd, max_window=max(w.max_window, snd_wnd),
                  rcv_wnd=rcv_wnd, rcv_wup=rcv_nxt)


def _timestamp(ici: Ici, answer: PeerAnswer, now_ms: int, margin_ms: int) -> Timestamp:
    """The clock to restore: never below the estimate nor the peer's TSecr + 1."""
    if TcpOption.TIMESTAMPS not in ici.params.options:
        return ici.timestamp
    if answer.tsval is None or answer.tsecr is None:
        raise PlanRefused("timestamps", f"expected TSval and TSecr in the answer of a flow that "
                          f"negotiated timestamps, got TSval {answer.tsval}, TSecr {answer.tsecr}")
    estimate = ici.timestamp.estimate(now_ms, margin_ms)
    floor = clock_value(seq_add(answer.tsecr, 1), ici.timestamp.usec)
    return Timestamp(floor if after(floor, estimate) else estimate, now_ms)
