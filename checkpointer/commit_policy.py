"""When to commit inbound bytes (and so let the ACK gate acknowledge them): the pure policy.

The peer counts held bytes as in flight and stops sending once about a congestion window is held,
so a fixed byte threshold alone deadlocks (DESIGN.md section 4). Every policy therefore commits
when the application would block on reading (idle flush): at that point the peer may be waiting
for our ACK. On top of that a short timer commits while data keeps streaming, and an optional byte
threshold commits earlier on bulk transfers.

    policy = CommitPolicy()                  # idle flush + 5 ms timer (the default)
    clock = PolicyState()
    clock, go = decide(policy, clock, Read(n, now))       # after each read
    clock, go = decide(policy, clock, WouldBlock(now))    # before blocking on the socket
    clock, go = decide(policy, clock, Tick(now))          # when next_deadline(...) is reached
    if go: checkpoint, then gate.commit(flow, committed_seq(base, clock.consumed, clock.eof))

No I/O here: time comes in with the events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

SEQ_MASK = 0xFFFFFFFF


class PolicyError(ValueError):
    """A policy or event that does not make sense (negative sizes, time going back)."""


@dataclass(frozen=True, slots=True)
class CommitPolicy:
    """Idle flush always; interval_s: commit pending bytes this long after the first one was
    read (None: no timer); every_bytes: commit as soon as this many are pending (None: never)."""

    interval_s: float | None = 0.005
    every_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.interval_s is not None and not self.interval_s > 0:
            raise PolicyError(f"interval_s must be > 0 or None, got {self.interval_s}")
        if self.every_bytes is not None and self.every_bytes <= 0:
            raise PolicyError(f"every_bytes must be > 0 or None, got {self.every_bytes}")


class Reason(enum.Enum):
    """Why a commit is due."""

    IDLE = "idle"
    TIMER = "timer"
    BYTES = "bytes"
    EOF = "eof"


@dataclass(frozen=True, slots=True)
class PolicyState:
    """consumed: bytes read so far; committed: bytes covered by the last commit; pending_since:
    when the oldest uncommitted byte was read (None: nothing pending); eof: FIN was read."""

    consumed: int = 0
    committed: int = 0
    pending_since: float | None = None
    eof: bool = False
    eof_committed: bool = False
    now: float = 0.0

    @property
    def pending(self) -> int:
        return self.consumed - self.committed


@dataclass(frozen=True, slots=True)
class Read:
    """The application consumed n bytes (n == 0: end of stream) at time now."""

    n: int
    now: float


@dataclass(frozen=True, slots=True)
class WouldBlock:
    """The application is about to block waiting for more bytes."""

    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (the timer from next_deadline fired)."""

    now: float


Event = Read | WouldBlock | Tick


def decide(policy: CommitPolicy, state: PolicyState,
           event: Event) -> tuple[PolicyState, Reason | None]:
    """The state after event and, when a commit is due now, why (the state then already counts
    everything consumed as committed: the caller must commit before its next event)."""
    if event.now < state.now:
        raise PolicyError(f"time must not go back: state at {state.now}, event at {event.now}")
    s = replace(state, now=event.now)
    if isinstance(event, Read):
        if event.n < 0:
            raise PolicyError(f"a read consumes >= 0 bytes, got {event.n}")
        if s.eof:
            raise PolicyError(f"expected no read after end of stream, got {event.n} bytes")
        if event.n == 0:
            return _commit(replace(s, eof=True), Reason.EOF)
        s = replace(s, consumed=s.consumed + event.n,
                    pending_since=s.pending_since if s.pending else event.now)
        if policy.every_bytes is not None and s.pending >= policy.every_bytes:
            return _commit(s, Reason.BYTES)
        return _timer(policy, s)
    if isinstance(event, WouldBlock):
        if s.pending or (s.eof and not s.eof_committed):
            return _commit(s, Reason.IDLE)
        return s, None
    return _timer(policy, s)


def _timer(policy: CommitPolicy, s: PolicyState) -> tuple[PolicyState, Reason | None]:
    due = next_deadline(policy, s)
    if due is not None and s.now >= due:
        return _commit(s, Reason.TIMER)
    return s, None


def _commit(s: PolicyState, reason: Reason) -> tuple[PolicyState, Reason]:
    return replace(s, committed=s.consumed, pending_since=None, eof_committed=s.eof), reason


def next_deadline(policy: CommitPolicy, state: PolicyState) -> float | None:
    """When the timer must fire (a Tick) for the pending bytes; None when nothing is pending."""
    if state.pending_since is None or policy.interval_s is None or not state.pending:
        return None
    return state.pending_since + policy.interval_s


def committed_seq(base_seq: int, committed_bytes: int, eof: bool) -> int:
    """The receive sequence to commit: base_seq is the first byte's sequence (the peer's ISN + 1);
    a consumed FIN counts one more (end of stream is committed as end + 1)."""
    if committed_bytes < 0:
        raise PolicyError(f"committed bytes must be >= 0, got {committed_bytes}")
    return (base_seq + committed_bytes + (1 if eof else 0)) & SEQ_MASK
