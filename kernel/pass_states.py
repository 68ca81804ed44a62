"""The state table of one planned pass, seen from the origin, and how each connection ends. Pure.

    CHOSEN ─isolate─► ISOLATED ─dump─► DUMPED ─send─► SENT ─report─► RESTORED
           ─switch─► SWITCHED ─activate─► ACTIVATED

A failure in any state runs that state's undo list (UNDO), in order, and every connection is
resumed on the origin: the isolation rolled back, the socket out of repair mode. A step that
fails half-way undoes its own partial work before it raises (an isolation that guarded three of
five flows releases those three), so the pass is always in one of the states of the table.

Once ACTIVATE is sent the destination may own the connections, so there is no undo: each
connection ends by the destination's DONE answer (`endings`). Every chosen connection ends
exactly one way:

    PASSED    live on the destination, the origin's copy closed silently (repair mode)
    RESUMED   live on the origin again, verified out of repair mode
    CLOSED    closed silently on the origin with a logged reason: the destination's DONE never
              came, so it may own the connection and the origin must never speak for it again
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class PassStateError(ValueError):
    """A step that does not fit the state the pass is in."""


class State(enum.Enum):
    CHOSEN = "chosen"
    ISOLATED = "isolated"
    DUMPED = "dumped"
    SENT = "sent"
    RESTORED = "restored"
    SWITCHED = "switched"
    ACTIVATED = "activated"


class Step(enum.Enum):
    ISOLATE = "isolate"      # freeze egress + quarantine ingress of every chosen flow
    DUMP = "dump"            # TCP_REPAIR dump, sockets stay in repair mode
    SEND = "send"            # the signed BATCH is on its way
    REPORT = "report"        # the destination's REPORT came, checked to cover every index
    SWITCH = "switch"        # traffic of the restored flows moved to the destination
    ACTIVATE = "activate"    # ACTIVATE sent: from here on the destination may own them


class Undo(enum.Enum):
    UNSWITCH = "unswitch"            # move the switched flows' traffic back to the origin
    ABORT_REMOTE = "abort_remote"    # tell the destination to discard (it also does on silence)
    REPAIR_OFF = "repair_off"        # take the sockets out of repair mode, verified
    LIFT_ISOLATION = "lift"          # stop freezing and quarantining the flows


TRANSITIONS: dict[tuple[State, Step], State] = {
    (State.CHOSEN, Step.ISOLATE): State.ISOLATED,
    (State.ISOLATED, Step.DUMP): State.DUMPED,
    (State.DUMPED, Step.SEND): State.SENT,
    (State.SENT, Step.REPORT): State.RESTORED,
    (State.RESTORED, Step.SWITCH): State.SWITCHED,
    (State.SWITCHED, Step.ACTIVATE): State.ACTIVATED,
}

UNDO: dict[State, tuple[Undo, ...]] = {
    State.CHOSEN: (),
    State.ISOLATED: (Undo.LIFT_ISOLATION,),
    State.DUMPED: (Undo.REPAIR_OFF, Undo.LIFT_ISOLATION),
    State.SENT: (Undo.ABORT_REMOTE, Undo.REPAIR_OFF, Undo.LIFT_ISOLATION),
    State.RESTORED: (Undo.ABORT_REMOTE, Undo.REPAIR_OFF, Undo.LIFT_ISOLATION),
    State.SWITCHED: (Undo.UNSWITCH, Undo.ABORT_REMOTE, Undo.REPAIR_OFF, Undo.LIFT_ISOLATION),
}
"""What takes the pass back from each state to live connections on the origin. ACTIVATED has
no entry: past it nothing is undone (see endings)."""


def advance(state: State, step: Step) -> State:
    """The state after `step` succeeded in `state`; PassStateError if the step does not fit."""
    try:
        return TRANSITIONS[(state, step)]
    except KeyError:
        raise PassStateError(f"step {step.value} does not follow state {state.value}") from None


def undo(state: State) -> tuple[Undo, ...]:
    """The undo list for a failure in `state`; PassStateError once ACTIVATE is sent."""
    try:
        return UNDO[state]
    except KeyError:
        raise PassStateError(f"no undo from state {state.value}: the destination may own "
                             "the connections") from None


class Ending(enum.Enum):
    PASSED = "passed"
    RESUMED = "resumed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class End:
    """How one chosen connection ended, and why when it was not passed."""

    ending: Ending
    reason: str = ""


def endings(count: int, refused: Sequence[tuple[int, str]],
            done: tuple[Sequence[int], Sequence[tuple[int, str]]] | None) -> list[End]:
    """Endings of a pass whose REPORT refused `refused` and which then sent ACTIVATE.

    done is the DONE answer (activated, failed) or None when it never came. Refused
    connections were never switched and resume; those the destination failed to activate were
    discarded there silently, so they resume too (after their traffic is moved back); without a
    DONE the restored ones are closed, since the destination may be live.
    """
    out: list[End | None] = [None] * count
    for i, why in refused:
        out[i] = End(Ending.RESUMED, f"refused by the destination: {why}")
    if done is None:
        for i in range(count):
            if out[i] is None:
                out[i] = End(Ending.CLOSED, "the destination never confirmed activation; it may "
                             "own the connection, so the origin stays silent")
    else:
        activated, failed = done
        for i in activated:
            out[i] = End(Ending.PASSED)
        for i, why in failed:
            out[i] = End(Ending.RESUMED, f"activation failed on the destination: {why}")
    missing = [i for i, e in enumerate(out) if e is None]
    if missing:
        raise PassStateError(f"indices {missing[:10]} have no ending: the answers do not cover "
                             f"every connection")
    return [e for e in out if e is not None]
