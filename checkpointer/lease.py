"""The origin's lease and self-fencing (DESIGN.md section 6.1): the pure state machine.

The checkpointer renews the origin's lease in the store well inside its TTL. If it cannot renew
in time it freezes every guarded flow *before* the lease can have expired anywhere else, so a
partitioned-but-alive origin never talks to a peer after a standby took the connections over.

    machine = LeaseMachine(LeaseTiming(ttl_ms=3000, renew_ms=1000))
    machine, actions = decide(machine, Tick(now_ms))          # at machine.wake_at_ms, or sooner
    ... run the actions: ACQUIRE / RENEW (one store call at a time), FREEZE_ALL, THAW_ALL ...
    machine, actions = decide(machine, Renewed(now_ms))       # the store call's outcome

No I/O here (checkpointer/leaseloop.py is the shell): time comes in with the events, in
milliseconds of one monotonic clock.

The safety rule. A renewal's request is sent at s (the machine counts s as the time it ordered the
RENEW, never later than the real send); the store extends the lease when it receives the request,
at or after s, to TTL from then. So on the store the lease lives at least until s + TTL, however
long the request or its reply take. The keeper orders FREEZE_ALL at the deadline

    last successful renewal's sent time + TTL - margin

(on the first event at or after it: the shell delivers a Tick at wake_at_ms), and never counts a
renewal from its reply. The margin covers what separates our clock's s + TTL from the store's
expiry and the moment the flows are really frozen: the two clocks' rate difference over one TTL,
the shell waking late, and the freeze's own latency. Redis expires keys on its wall clock, so the
store's host must not step its clock forwards (slew it).

Recovery. Once frozen, the keeper thaws only when the store confirms that the lease is still ours
at the same epoch, by a reply that arrives before that renewal's own deadline: a renewal that
succeeded (the store checked the epoch), or, when the lease had already expired unclaimed
(LeaseLost at our epoch), a fresh acquire that returned our epoch. A claim by another holder (a
higher epoch: StaleEpoch, NotOwner, LeaseHeld, or an acquire returning another epoch) is final:
TAKEN_OVER stays frozen and never thaws.

Every transition is one row of TRANSITIONS; decide() only classifies the event into a Signal and
keeps the timers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class LeaseError(ValueError):
    """A timing that cannot keep the rule, or an event that does not fit the keeper's state."""


class LeaseState(enum.Enum):
    """ACQUIRING: no lease yet (nothing guarded may be opened); HELD: renewed in time;
    RENEW_FAILING: a renewal failed but the deadline is still ahead (flows still open);
    FENCED: every flow frozen, trying to renew; TAKEN_OVER: another holder claimed the origin,
    frozen for good; STOPPED: the keeper was stopped."""

    ACQUIRING = "acquiring"
    HELD = "held"
    RENEW_FAILING = "renew_failing"
    FENCED = "fenced"
    TAKEN_OVER = "taken_over"
    STOPPED = "stopped"


class Action(enum.Enum):
    """What the shell must do, in the order given. ACQUIRE and RENEW are store calls whose outcome
    comes back as an event; at most one is in flight."""

    ACQUIRE = "acquire"
    RENEW = "renew"
    FREEZE_ALL = "freeze_all"
    THAW_ALL = "thaw_all"
    REPORT_TAKEN_OVER = "report_taken_over"


class FailReason(enum.Enum):
    """Why a store call failed without saying that another holder has the origin."""

    UNAVAILABLE = "unavailable"  # store unreachable, timed out, durability not reached
    EXPIRED = "expired"          # LeaseLost at our epoch: the lease ran out, nobody claimed it


def default_margin_ms(ttl_ms: int) -> int:
    """The default safety margin: a tenth of the TTL, at least 100 ms."""
    return max(ttl_ms // 10, 100)


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """ttl_ms: the lease's TTL in the store; renew_ms: renew this long after the last successful
    renewal was sent; margin_ms: freeze this long before the lease could expire (None: the
    default, max(ttl/10, 100 ms)); retry_ms: retry a failed store call after this long (None:
    renew_ms / 4, at least 1 ms)."""

    ttl_ms: int
    renew_ms: int
    margin_ms: int | None = None
    retry_ms: int | None = None

    def __post_init__(self) -> None:
        if self.ttl_ms <= 0:
            raise LeaseError(f"ttl_ms must be > 0, got {self.ttl_ms}")
        if not 0 < self.margin < self.ttl_ms:
            raise LeaseError(f"margin_ms must be in (0, ttl_ms={self.ttl_ms}), got {self.margin}")
        if not 0 < self.renew_ms < self.ttl_ms - self.margin:
            raise LeaseError(f"renew_ms must be in (0, ttl_ms - margin_ms = "
                             f"{self.ttl_ms - self.margin}), got {self.renew_ms}")
        if self.retry <= 0:
            raise LeaseError(f"retry_ms must be > 0, got {self.retry}")

    @property
    def margin(self) -> int:
        return default_margin_ms(self.ttl_ms) if self.margin_ms is None else self.margin_ms

    @property
    def retry(self) -> int:
        return max(self.renew_ms // 4, 1) if self.retry_ms is None else self.retry_ms


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (the shell's timer reached wake_at_ms, or it just looks)."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class Acquired:
    """The ACQUIRE in flight returned: the store gave us the lease at this epoch."""

    epoch: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class Renewed:
    """The RENEW in flight returned: the store extended the lease at our epoch (durably)."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class RenewFailed:
    """The store call in flight (RENEW or ACQUIRE) failed for `reason`."""

    now_ms: int
    reason: FailReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Lost:
    """The store call in flight says another holder claimed the origin (StaleEpoch, NotOwner,
    LeaseHeld); claimed_epoch: the origin's epoch now, when known."""

    now_ms: int
    claimed_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The keeper is stopping (the flows stay as they are; the lease is not released)."""


Event = Tick | Acquired | Renewed | RenewFailed | Lost | Stop


class Signal(enum.Enum):
    """An event as the transition table sees it (decide() classifies events into these)."""

    TICK = "tick"                 # time passed, nothing else happened
    DEADLINE = "deadline"         # the last renewal's deadline passed while flows were open
    GRANTED = "granted"           # a fresh ACQUIRE reply with our epoch (or the first one)
    RENEWED = "renewed"           # a fresh RENEW reply
    LATE = "late"                 # a success whose own deadline passed before the reply came
    FAILED = "failed"             # a store call failed (unavailable)
    EXPIRED = "expired"           # the store says our lease ran out; our epoch still stands
    CLAIMED = "claimed"           # another holder has the origin
    STOP = "stop"


S = LeaseState
A = Action
_TAKEN = (A.FREEZE_ALL, A.REPORT_TAKEN_OVER)

# (state, signal) -> (next state, actions). A pair missing here does not fit: LeaseError.
TRANSITIONS: dict[tuple[LeaseState, Signal], tuple[LeaseState, tuple[Action, ...]]] = {
    (S.ACQUIRING, Signal.TICK): (S.ACQUIRING, ()),
    (S.ACQUIRING, Signal.GRANTED): (S.HELD, ()),
    (S.ACQUIRING, Signal.LATE): (S.ACQUIRING, ()),
    (S.ACQUIRING, Signal.FAILED): (S.ACQUIRING, ()),
    (S.ACQUIRING, Signal.EXPIRED): (S.ACQUIRING, ()),
    (S.ACQUIRING, Signal.CLAIMED): (S.TAKEN_OVER, _TAKEN),
    (S.ACQUIRING, Signal.STOP): (S.STOPPED, ()),

    (S.HELD, Signal.TICK): (S.HELD, ()),
    (S.HELD, Signal.DEADLINE): (S.FENCED, (A.FREEZE_ALL,)),
    (S.HELD, Signal.RENEWED): (S.HELD, ()),
    (S.HELD, Signal.LATE): (S.FENCED, (A.FREEZE_ALL,)),
    (S.HELD, Signal.FAILED): (S.RENEW_FAILING, ()),
    (S.HELD, Signal.EXPIRED): (S.FENCED, (A.FREEZE_ALL,)),
    (S.HELD, Signal.CLAIMED): (S.TAKEN_OVER, _TAKEN),
    (S.HELD, Signal.STOP): (S.STOPPED, ()),

    (S.RENEW_FAILING, Signal.TICK): (S.RENEW_FAILING, ()),
    (S.RENEW_FAILING, Signal.DEADLINE): (S.FENCED, (A.FREEZE_ALL,)),
    (S.RENEW_FAILING, Signal.RENEWED): (S.HELD, ()),
    (S.RENEW_FAILING, Signal.LATE): (S.FENCED, (A.FREEZE_ALL,)),
    (S.RENEW_FAILING, Signal.FAILED): (S.RENEW_FAILING, ()),
    (S.RENEW_FAILING, Signal.EXPIRED): (S.FENCED, (A.FREEZE_ALL,)),
    (S.RENEW_FAILING, Signal.CLAIMED): (S.TAKEN_OVER, _TAKEN),
    (S.RENEW_FAILING, Signal.STOP): (S.STOPPED, ()),

    (S.FENCED, Signal.TICK): (S.FENCED, ()),
    (S.FENCED, Signal.GRANTED): (S.HELD, (A.THAW_ALL,)),
    (S.FENCED, Signal.RENEWED): (S.HELD, (A.THAW_ALL,)),
    (S.FENCED, Signal.LATE): (S.FENCED, ()),
    (S.FENCED, Signal.FAILED): (S.FENCED, ()),
    (S.FENCED, Signal.EXPIRED): (S.FENCED, ()),
    (S.FENCED, Signal.CLAIMED): (S.TAKEN_OVER, (A.REPORT_TAKEN_OVER,)),
    (S.FENCED, Signal.STOP): (S.STOPPED, ()),

    (S.TAKEN_OVER, Signal.TICK): (S.TAKEN_OVER, ()),
    (S.TAKEN_OVER, Signal.STOP): (S.STOPPED, ()),

    (S.STOPPED, Signal.TICK): (S.STOPPED, ()),
    (S.STOPPED, Signal.STOP): (S.STOPPED, ()),
}

# States whose flows are open and whose lease is counted: the deadline applies to them.
OPEN_HOLDING = frozenset({S.HELD, S.RENEW_FAILING})
# States that keep calling the store.
CALLING = frozenset({S.ACQUIRING, S.HELD, S.RENEW_FAILING, S.FENCED})
# States in which every guarded flow is frozen.
FROZEN = frozenset({S.FENCED, S.TAKEN_OVER})


@dataclass(frozen=True, slots=True)
class Request:
    """The store call in flight: which one, and when it was ordered (<= when it was sent)."""

    action: Action
    sent_ms: int


@dataclass(frozen=True, slots=True)
class LeaseMachine:
    """The keeper's whole state. epoch: the epoch we hold (None before the first acquire);
    renewed_sent_ms: when the last successful ACQUIRE/RENEW was sent; next_call: the store call
    to make at next_call_ms; claimed_epoch: the epoch that took the origin over, when known."""

    timing: LeaseTiming
    state: LeaseState = LeaseState.ACQUIRING
    now_ms: int | None = None
    epoch: int | None = None
    renewed_sent_ms: int | None = None
    in_flight: Request | None = None
    next_call: Action = Action.ACQUIRE
    next_call_ms: int = 0
    claimed_epoch: int | None = None

    @property
    def deadline_ms(self) -> int | None:
        """When FREEZE_ALL is due unless a renewal succeeds: last renewal sent + TTL - margin."""
        if self.renewed_sent_ms is None:
            return None
        return self.renewed_sent_ms + self.timing.ttl_ms - self.timing.margin

    @property
    def frozen(self) -> bool:
        return self.state in FROZEN

    @property
    def wake_at_ms(self) -> int | None:
        """When the shell must deliver a Tick at the latest (None: no timer needed)."""
        times = []
        if self.state in OPEN_HOLDING and self.deadline_ms is not None:
            times.append(self.deadline_ms)
        if self.state in CALLING and self.in_flight is None:
            times.append(self.next_call_ms)
        return min(times) if times else None


def _misfit(m: LeaseMachine, event: Event, why: str) -> LeaseError:
    return LeaseError(f"state {m.state.name} does not accept {event!r}: {why}")


def _reply_signal(m: LeaseMachine, event: Acquired | Renewed | RenewFailed | Lost,
                  request: Request) -> Signal:
    if isinstance(event, Lost):
        return Signal.CLAIMED
    if isinstance(event, RenewFailed):
        return Signal.EXPIRED if event.reason is FailReason.EXPIRED else Signal.FAILED
    if isinstance(event, Acquired) and m.epoch is not None and event.epoch != m.epoch:
        return Signal.CLAIMED  # the origin's fencing state changed under us: never trust it
    fresh = event.now_ms < request.sent_ms + m.timing.ttl_ms - m.timing.margin
    if not fresh:
        return Signal.LATE
    return Signal.GRANTED if isinstance(event, Acquired) else Signal.RENEWED


def _apply(m: LeaseMachine, signal: Signal,
           event: Event) -> tuple[LeaseMachine, tuple[Action, ...]]:
    row = TRANSITIONS.get((m.state, signal))
    if row is None:
        raise _misfit(m, event, f"no transition for {signal.name}")
    state, actions = row
    return replace(m, state=state), actions


def decide(m: LeaseMachine, event: Event) -> tuple[LeaseMachine, tuple[Action, ...]]:
    """The machine after event and the actions to run, in order."""
    actions: tuple[Action, ...] = ()
    if isinstance(event, Stop):
        return _apply(m, Signal.STOP, event)
    now = event.now_ms
    if m.now_ms is not None and now < m.now_ms:
        raise _misfit(m, event, f"time must not go back (machine at {m.now_ms} ms)")
    m = replace(m, now_ms=now)

    # 1. The clock first: a deadline that passed is honoured before anything the event says.
    deadline = m.deadline_ms
    if m.state in OPEN_HOLDING and deadline is not None and now >= deadline:
        m, actions = _apply(m, Signal.DEADLINE, event)

    # 2. The event.
    if isinstance(event, Tick):
        m, more = _apply(m, Signal.TICK, event)
    else:
        request = m.in_flight
        if request is None:
            raise _misfit(m, event, "no store call is in flight")
        expected = (Action.ACQUIRE if isinstance(event, Acquired) else
                    Action.RENEW if isinstance(event, Renewed) else request.action)
        if request.action is not expected:
            raise _misfit(m, event, f"the call in flight is {request.action.name}")
        signal = _reply_signal(m, event, request)
        m, more = _apply(replace(m, in_flight=None), signal, event)
        m = _after_reply(m, signal, event, request)
    actions += more

    # 3. The next store call, when due.
    if m.state in CALLING and m.in_flight is None and now >= m.next_call_ms:
        actions += (m.next_call,)
        m = replace(m, in_flight=Request(m.next_call, now))
    return m, actions


def _after_reply(m: LeaseMachine, signal: Signal, event: Event, request: Request) -> LeaseMachine:
    """The timers and epoch after a reply (the state was set by the table)."""
    now = m.now_ms
    assert now is not None
    if signal in (Signal.GRANTED, Signal.RENEWED):
        epoch = event.epoch if isinstance(event, Acquired) else m.epoch
        return replace(m, epoch=epoch, renewed_sent_ms=request.sent_ms, next_call=Action.RENEW,
                       next_call_ms=request.sent_ms + m.timing.renew_ms)
    if signal is Signal.EXPIRED:
        return replace(m, next_call=Action.ACQUIRE, next_call_ms=now)  # re-take it at our epoch
    if signal is Signal.CLAIMED:
        claimed = event.epoch if isinstance(event, Acquired) else (
            event.claimed_epoch if isinstance(event, Lost) else None)
        return replace(m, claimed_epoch=claimed)
    return replace(m, next_call_ms=now + m.timing.retry)  # FAILED, LATE: retry the same call


METRIC_NAMES = {
    S.ACQUIRING: "lost", S.HELD: "held", S.RENEW_FAILING: "renewing", S.FENCED: "fenced",
    S.TAKEN_OVER: "taken_over", S.STOPPED: "lost",
}


def metric_name(state: LeaseState) -> str:
    """The state's name in checkpointer.metrics.LEASE_STATES."""
    return METRIC_NAMES[state]
