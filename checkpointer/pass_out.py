"""The origin half of planned passing: isolate, dump, send, switch, activate, or undo.

    result, resumed = pass_out(conns, ("10.77.2.11", 7070), Party("origin", "standby", epoch),
                               keyring, isolation, switch)

Runs the state table of kernel/pass_states.py over the signed conversation of kernel/transfer.py:

    isolate   every chosen flow frozen and quarantined (all or nothing)
    dump      TCP_REPAIR dump; the sockets stay in repair mode, silent
    send      one signed BATCH to the destination's receiver
    report    its signed REPORT, checked to name every index exactly once
    switch    the restored flows' traffic moved to the destination (switch.move; refused ones
              stay here)
    activate  ACTIVATE sent; the destination's DONE says which went live

A failure before ACTIVATE runs the undo list of the state reached (traffic moved back, ABORT,
repair off verified, isolation lifted) and every connection resumes here. After ACTIVATE each
connection ends by DONE: passed (closed here silently), resumed (the destination could not
activate it and discarded it silently) or, without a DONE, closed here silently with the reason
logged, since the destination may own it. Every chosen connection ends exactly one way and the
result says which.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from kernel import channel, repair, transfer
from kernel.errors import KernelError
from kernel.ici import Identity
from kernel.isolation import FlowIsolation, flow_of
from kernel.pass_states import End, Ending, State, Step, Undo, advance, endings, undo
from kernel.sanity import RESTORABLE_STATES
from kernel.transfer import Envelope, Frame, Kind, Limits, Outcome, Signer, TransferError

log = structlog.get_logger(component="tcpcp.checkpointer.pass_out")


class PassFault(KernelError):
    """A failure injected by a test at a chosen step (Faults)."""


class TrafficSwitch(Protocol):
    """Moves chosen flows' traffic to the destination, and back. Either call is all or nothing
    (a switch that fails half-way puts back what it moved before raising)."""

    def move(self, flows: Sequence[Identity]) -> None: ...

    def back(self, flows: Sequence[Identity]) -> None: ...


@dataclass(frozen=True, slots=True)
class Party:
    """Who passes (origin), to whom (destination), under which epoch of the origin's lease."""

    origin: str
    destination: str
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault injection for tests: fail at `step`, after `after` connections where the step
    handles them one by one (isolate, dump), or half-way through the frame (send)."""

    step: Step | None = None
    after: int = 0


@dataclass(frozen=True, slots=True)
class PassResult:
    """How each chosen connection ended, and how long the steps took."""

    ends: tuple[tuple[Identity | None, End], ...]
    timings_us: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def count(self, ending: Ending) -> int:
        return sum(1 for _, e in self.ends if e.ending is ending)

    @property
    def passed(self) -> tuple[Identity | None, ...]:
        return tuple(f for f, e in self.ends if e.ending is Ending.PASSED)

    @property
    def not_passed(self) -> tuple[tuple[Identity | None, End], ...]:
        return tuple((f, e) for f, e in self.ends if e.ending is not Ending.PASSED)


def _unpassable(sock: socket.socket) -> str:
    """Why a socket cannot be passed ('' when it can): not connected, or in a state the
    kernel layer does not recreate (a closed one, one still in its handshake)."""
    try:
        flow_of(sock)
        state = repair.tcp_state(sock)
    except (OSError, ValueError) as exc:
        return f"not connected ({exc})"
    if state not in RESTORABLE_STATES:
        return f"state {state.name}"
    return ""


def _in_repair(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(repair.SOL_TCP, repair.TCP_REPAIR))


def _resume(sock: socket.socket) -> str:
    """Take a socket out of repair mode (a window probe wakes the peer); '' when verified,
    else the reason it could not be."""
    try:
        if _in_repair(sock):
            sock.setsockopt(repair.SOL_TCP, repair.TCP_REPAIR, repair.REPAIR_OFF)
        if _in_repair(sock):
            return "still in repair mode after TCP_REPAIR=0"
    except OSError as exc:
        return f"repair off failed: {exc}"
    return ""


def _close_silently(sock: socket.socket) -> None:
    """Close without a FIN or RST: in repair mode, or not at all if repair mode is refused."""
    try:
        if not _in_repair(sock):
            sock.setsockopt(repair.SOL_TCP, repair.TCP_REPAIR, repair.REPAIR_ON)
        sock.close()
    except OSError as exc:
        log.error("silent_close_failed", error=str(exc), fd=sock.fileno())


def _lift_later(isolation: FlowIsolation, flows: list[Identity], grace_s: float) -> None:
    """Lift the isolation after grace_s, unless the flows were isolated again meanwhile."""
    generations = {f: isolation.generation_of(f) for f in flows}

    def lift() -> None:
        for f, gen in generations.items():
            try:
                isolation.remove([f], generation=gen)
            except KernelError as exc:
                log.warning("isolation_not_lifted", conn=str(f), error=str(exc))

    timer = threading.Timer(grace_s, lift)
    timer.daemon = True
    timer.start()


def pass_out(
    conns: Sequence[tuple[socket.socket, bytes]],
    destination: tuple[str, int],
    party: Party,
    signer: Signer,
    isolation: FlowIsolation,
    switch: TrafficSwitch,
    *,
    limits: Limits | None = None,
    timeout_s: float = 30.0,
    grace_s: float = 1.0,
    faults: Faults | None = None,
) -> tuple[PassResult, list[tuple[socket.socket, bytes]]]:
    """Pass the (socket, application state) pairs; returns the result and the pairs resumed
    here (usable again by the application). The application must not touch the sockets while
    this runs. Never raises for a failed pass: the result says how each connection ended."""
    skip = {i: why for i, (s, _) in enumerate(conns) if (why := _unpassable(s))}
    if skip:  # not taken at all: handed back untouched, their traffic never moved
        rest = [c for i, c in enumerate(conns) if i not in skip]
        result, kept = pass_out(rest, destination, party, signer, isolation, switch,
                                limits=limits, timeout_s=timeout_s, grace_s=grace_s,
                                faults=faults) if rest else (PassResult((), {}, ""), [])
        done_ends = iter(result.ends)
        merged = tuple((None, End(Ending.RESUMED, f"not passable: {skip[i]}")) if i in skip
                       else next(done_ends) for i in range(len(conns)))
        for i, why in skip.items():
            log.info("connection_not_passed", ending="resumed", reason=why,
                     fd=conns[i][0].fileno())
        return (PassResult(merged, result.timings_us, result.error),
                [conns[i] for i in skip] + kept)
    faults = faults or Faults()
    limits = limits or Limits()
    plog = log.bind(to=f"{destination[0]}:{destination[1]}", destination=party.destination,
                    epoch=party.epoch, count=len(conns))
    socks = [s for s, _ in conns]
    try:
        flows = [flow_of(s) for s in socks]
    except OSError:  # one went away since _unpassable looked: look again, it will be skipped
        return pass_out(conns, destination, party, signer, isolation, switch, limits=limits,
                        timeout_s=timeout_s, grace_s=grace_s, faults=faults)
    t = {"start": time.perf_counter()}
    state = State.CHOSEN
    ctl: socket.socket | None = None
    env: Envelope | None = None
    restored: list[int] = []
    refused: tuple[tuple[int, str], ...] = ()

    def fault(step: Step, done: int | None = None) -> None:
        if faults.step is step and (done is None or done >= faults.after):
            raise PassFault(f"injected fault at step {step.value}"
                            + (f" after {done} connections" if done is not None else ""))

    try:
        isolation.add(flows, socks,
                      fail_after=faults.after if faults.step is Step.ISOLATE else None)
        state = advance(state, Step.ISOLATE)
        t["isolate"] = time.perf_counter()
        icis = []
        try:
            for i, s in enumerate(socks):
                fault(Step.DUMP, i)
                icis.append(repair.dump(s, stay_in_repair=True))
        except BaseException:
            for s in socks[: len(icis)]:  # the step's own partial work: out of repair mode
                if why := _resume(s):
                    plog.error("repair_off_failed", conn=_name(s), error=why)
            raise
        state = advance(state, Step.DUMP)
        t["dump"] = time.perf_counter()
        env = Envelope(signer.sign_with, party.origin, party.destination, party.epoch,
                       os.urandom(transfer.NONCE_BYTES), time.time_ns() // 1_000_000)
        data = transfer.batch([(ici, st) for ici, (_, st) in zip(icis, conns, strict=True)],
                              env, signer)
        ctl = socket.create_connection(destination, timeout=timeout_s)
        if faults.step is Step.SEND:
            ctl.sendall(data[: len(data) // 2])
            fault(Step.SEND)
        channel.send_frame(ctl, data, timeout_s=timeout_s)
        state = advance(state, Step.SEND)
        report = channel.recv_frame(ctl, Kind.REPORT, signer, limits, timeout_s=timeout_s)
        transfer.check_answer(report, env)
        assert report.outcome is not None
        transfer.check_coverage(report.outcome, len(conns), "destination's REPORT")
        fault(Step.REPORT)
        state = advance(state, Step.REPORT)
        t["transfer_restore"] = time.perf_counter()
        restored, refused = sorted(report.outcome.ok), report.outcome.failed
        if restored:
            switch.move([flows[i] for i in restored])
        state = advance(state, Step.SWITCH)
        fault(Step.SWITCH)
        t["switch"] = time.perf_counter()
    except Exception as exc:
        reason = f"pass abandoned in state {state.value}: {exc}"
        plog.warning("pass_undone", state=state.value, error=str(exc),
                     undo=[u.value for u in undo(state)])
        ends = _undo(state, socks, flows, [flows[i] for i in restored], isolation, switch, ctl,
                     env, signer, reason)
        if ctl is not None:
            ctl.close()
        return _finish(conns, flows, ends, t, plog, reason)

    assert ctl is not None and env is not None
    with ctl:
        done: tuple[tuple[int, ...], tuple[tuple[int, str], ...]] | None = None
        if restored:
            try:
                channel.send_frame(ctl, transfer.encode(
                    Frame(Kind.ACTIVATE, env.reply(time.time_ns() // 1_000_000)), signer))
                state = advance(state, Step.ACTIVATE)
                fault(Step.ACTIVATE)
                answer = channel.recv_frame(ctl, Kind.DONE, signer, limits, timeout_s=timeout_s)
                transfer.check_answer(answer, env)
                assert answer.outcome is not None
                done = _check_done(answer.outcome, restored)
            except Exception as exc:
                plog.error("activation_unconfirmed", error=str(exc), restored=len(restored))
        else:
            _send_abort(ctl, env, signer, "the destination restored none")
            done = ((), ())
        t["activate"] = time.perf_counter()
    ends = endings(len(conns), refused, done)
    failed_there = [flows[i] for i, e in enumerate(ends)
                    if e.ending is Ending.RESUMED and i in restored]
    if failed_there:
        try:
            switch.back(failed_there)
        except Exception as exc:
            plog.error("switch_back_failed", error=str(exc), flows=len(failed_there))
            ends = [End(Ending.CLOSED, f"discarded by the destination and its traffic could not "
                        f"be moved back: {exc}") if f in failed_there else e
                    for f, e in zip(flows, ends, strict=True)]
    ends = [_end_one(socks[i], e) for i, e in enumerate(ends)]
    resumed = [f for f, e in zip(flows, ends, strict=True) if e.ending is Ending.RESUMED]
    if resumed:
        isolation.remove(resumed)
    gone = [f for f, e in zip(flows, ends, strict=True) if e.ending is not Ending.RESUMED]
    if gone:
        _lift_later(isolation, gone, grace_s)
    return _finish(conns, flows, ends, t, plog, "")


def _check_done(out: Outcome, restored: list[int]) -> tuple[tuple[int, ...],
                                                             tuple[tuple[int, str], ...]]:
    """DONE must name each restored index exactly once, and no other."""
    seen = [*out.ok, *(i for i, _ in out.failed)]
    if sorted(seen) != restored:
        raise TransferError(f"destination's DONE: expected exactly the restored indices "
                            f"{restored[:10]}..., got {sorted(seen)[:10]}...")
    return out.ok, out.failed


def _end_one(sock: socket.socket, end: End) -> End:
    """Carry out one connection's ending on this host."""
    if end.ending is Ending.RESUMED:
        why = _resume(sock)
        if not why:
            return end
        _close_silently(sock)
        return End(Ending.CLOSED, f"could not be resumed ({why}); {end.reason}")
    _close_silently(sock)  # passed: the destination owns it; closed: it may
    return end


def _send_abort(ctl: socket.socket, env: Envelope, signer: Signer, reason: str) -> None:
    with contextlib.suppress(OSError, TransferError):
        channel.send_frame(ctl, transfer.encode(
            Frame(Kind.ABORT, env.reply(time.time_ns() // 1_000_000), reason=reason), signer),
            timeout_s=2.0)


def _undo(state: State, socks: list[socket.socket], flows: list[Identity],
          switched: list[Identity], isolation: FlowIsolation, switch: TrafficSwitch,
          ctl: socket.socket | None, env: Envelope | None, signer: Signer,
          reason: str) -> list[End]:
    """Run the undo list of `state`; every connection resumes, or is closed with the reason
    why it could not be."""
    ends = [End(Ending.RESUMED, reason) for _ in socks]
    for step in undo(state):
        if step is Undo.UNSWITCH and switched:
            try:
                switch.back(switched)
            except Exception as exc:  # their traffic is on the destination: never resume here
                log.error("switch_back_failed", error=str(exc), flows=len(switched))
                ends = [End(Ending.CLOSED, f"traffic could not be moved back: {exc}")
                        if f in switched else e for f, e in zip(flows, ends, strict=True)]
        elif step is Undo.ABORT_REMOTE and ctl is not None and env is not None:
            _send_abort(ctl, env, signer, reason)
        elif step is Undo.REPAIR_OFF:
            ends = [_end_one(s, e) if e.ending is Ending.RESUMED else _closed(s, e)
                    for s, e in zip(socks, ends, strict=True)]
        elif step is Undo.LIFT_ISOLATION:
            live = [f for f, e in zip(flows, ends, strict=True) if e.ending is Ending.RESUMED]
            try:
                isolation.remove(live)
            except KernelError as exc:
                log.error("isolation_not_lifted", error=str(exc), flows=len(live))
    if Undo.REPAIR_OFF not in undo(state):  # nothing was dumped: the sockets never left
        ends = [e if e.ending is Ending.RESUMED else _closed(s, e)
                for s, e in zip(socks, ends, strict=True)]
    return ends


def _closed(sock: socket.socket, end: End) -> End:
    _close_silently(sock)
    return end


def _finish(conns: Sequence[tuple[socket.socket, bytes]], flows: list[Identity],
            ends: list[End], t: dict[str, float], plog: structlog.typing.FilteringBoundLogger,
            error: str) -> tuple[PassResult, list[tuple[socket.socket, bytes]]]:
    marks = list(t.items())
    timings = {name: (at - marks[i - 1][1]) * 1e6 for i, (name, at) in enumerate(marks) if i}
    result = PassResult(tuple(zip(flows, ends, strict=True)), timings, error)
    for flow, end in zip(flows, ends, strict=True):
        if end.ending is not Ending.PASSED:
            plog.info("connection_not_passed", conn=str(flow), ending=end.ending.value,
                      reason=end.reason)
    plog.info("pass_ended", passed=result.count(Ending.PASSED),
              resumed=result.count(Ending.RESUMED), closed=result.count(Ending.CLOSED),
              **{k: round(v) for k, v in timings.items()})
    kept = [c for c, e in zip(conns, ends, strict=True) if e.ending is Ending.RESUMED]
    return result, kept


def _name(sock: socket.socket) -> str:
    try:
        return str(flow_of(sock))
    except OSError:
        return f"fd {sock.fileno()}"
