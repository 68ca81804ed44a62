"""checkpointer.lease: the lease keeper's pure state machine, against a simulated store.

The simulation plays the store (lease expiry, epoch, owner, holder, evaluated when each request
*reaches* it), an adversary that claims the origin whenever it sees the lease expired, requests
and replies that take arbitrarily long or are lost, and a shell that ticks at wake_at_ms (plus
spurious ticks). Every decide() is checked against the rules of DESIGN.md section 6.1.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer.lease import (
    FROZEN,
    OPEN_HOLDING,
    TRANSITIONS,
    Acquired,
    Action,
    Event,
    FailReason,
    LeaseError,
    LeaseMachine,
    LeaseState,
    LeaseTiming,
    Lost,
    Renewed,
    RenewFailed,
    Signal,
    Stop,
    Tick,
    decide,
    default_margin_ms,
    metric_name,
)
from checkpointer.metrics import LEASE_STATES

INF = 10**18


@dataclass(frozen=True)
class Plan:
    """How one store call goes: to_server / back: delays in ms; dropped: the request never
    reaches the store; reply_lost: it does, but the answer never comes back (both end as a
    timeout, reported after to_server + back + timeout_ms)."""

    to_server: int = 0
    back: int = 0
    dropped: bool = False
    reply_lost: bool = False
    timeout_ms: int = 0


@dataclass
class Store:
    """The lease as the store sees it; `drift` shortens every TTL (the store's clock runs fast)."""

    ttl_ms: int
    drift: int
    epoch: int = 0
    owner: str | None = None
    holder: str | None = None
    expiry: int = -1

    def live(self, now: int) -> bool:
        return self.holder is not None and self.expiry > now

    def ours_until(self, now: int) -> int:
        """Until when the lease is live and ours, seen at now (-1: it is not)."""
        return self.expiry if self.holder == "us" and self.live(now) else -1

    def acquire(self, now: int) -> Event:
        if self.live(now) and self.holder != "us":
            return Lost(0, self.epoch)                        # LeaseHeld
        if self.owner not in (None, "us"):
            return Lost(0, self.epoch)                        # NotOwner
        if self.owner is None:
            self.epoch += 1
            self.owner = "us"
        self.holder, self.expiry = "us", now + self.ttl_ms - self.drift
        return Acquired(self.epoch, 0)

    def renew(self, now: int, epoch: int) -> Event:
        if epoch != self.epoch or self.owner != "us":
            return Lost(0, self.epoch)                        # StaleEpoch / NotOwner
        if not (self.live(now) and self.holder == "us"):
            return RenewFailed(0, FailReason.EXPIRED)         # LeaseLost
        self.expiry = now + self.ttl_ms - self.drift
        return Renewed(0)

    def claim(self, now: int) -> bool:
        if self.live(now):
            return False
        self.epoch += 1
        self.owner, self.holder, self.expiry = "them", "them", INF
        return True


@dataclass
class Run:
    timing: LeaseTiming
    store: Store
    plans: list[Plan]
    claims: list[int]
    ticks: list[int]
    m: LeaseMachine = field(init=False)
    now: int = 0
    queue: list[tuple[int, int, str, object]] = field(default_factory=list)
    seq: int = 0
    sent_at: int | None = None          # the request in flight, when it was ordered
    replying_sent: int | None = None     # while its reply is fed: when that request was ordered
    plans_out_at: int | None = None     # when the last planned call ended (then calls succeed)
    last_planned_in_flight: bool = False
    epoch_at_send: int | None = None
    last_ok_sent: int | None = None      # the driver's own count of the last fresh success
    last_call: int | None = None
    frozen: bool = False
    taken_over: bool = False
    claimed: bool = False
    was_held: bool = False
    freezes: list[tuple[int, int | None]] = field(default_factory=list)  # (when, deadline)
    thaws: int = 0

    def __post_init__(self) -> None:
        self.m = LeaseMachine(self.timing)
        for c in self.claims:
            self.push(c, "claim", None)
        for t in self.ticks:
            self.push(t, "tick", None)

    def push(self, at: int, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, kind, payload))

    def deadline(self) -> int | None:
        t = self.timing
        return None if self.last_ok_sent is None else self.last_ok_sent + t.ttl_ms - t.margin

    # -- the checks, between and at events --

    def check_interval(self, until: int) -> None:
        """The machine's state held over [self.now, until): open flows need our live lease."""
        if self.m.state in OPEN_HOLDING:
            assert not self.frozen
            ours = self.store.ours_until(self.now)
            assert ours >= until, (f"flows open over [{self.now}, {until}) but the store's lease "
                                   f"is ours only until {ours}")
            d = self.deadline()
            assert d is not None and until <= d, f"open at {until}, past the deadline {d}"
            assert self.m.wake_at_ms is not None and self.m.wake_at_ms <= d

    def feed(self, event: Event) -> None:
        before = self.m
        self.m, actions = decide(self.m, event)
        t = self.timing
        for a in actions:
            if a is Action.FREEZE_ALL:
                assert not self.frozen, "FREEZE_ALL while frozen"
                self.frozen = True
                d = self.deadline()
                self.freezes.append((self.now, d))
                assert d is None or self.now <= d, f"froze at {self.now}, after the deadline {d}"
            elif a is Action.THAW_ALL:
                assert self.frozen and not self.taken_over, "THAW_ALL after TAKEN_OVER"
                assert isinstance(event, Renewed | Acquired), f"THAW_ALL on {event!r}"
                if isinstance(event, Acquired):
                    assert event.epoch == before.epoch is not None
                sent = self.replying_sent
                assert sent is not None and self.now < sent + t.ttl_ms - t.margin
                assert self.store.ours_until(self.now) > self.now
                self.frozen = False
                self.thaws += 1
            elif a is Action.REPORT_TAKEN_OVER:
                assert self.claimed, "taken over without a claim"
                self.taken_over = True
            else:
                assert self.sent_at is None, "a second store call while one is in flight"
                self.request(a)
        if self.taken_over:
            assert self.m.state is LeaseState.TAKEN_OVER and self.frozen
        assert self.frozen == (self.m.state in FROZEN)
        if self.m.state is LeaseState.HELD:
            self.was_held = True
            if self.m.in_flight is None:  # renewals at least every renew_ms while HELD
                assert self.last_call is not None and self.now < self.last_call + t.renew_ms
                assert self.m.wake_at_ms is not None
                assert self.m.wake_at_ms <= self.last_call + t.renew_ms

    def request(self, action: Action) -> None:
        self.sent_at, self.last_call = self.now, self.now
        self.epoch_at_send = self.m.epoch
        had_plan = bool(self.plans)
        plan = self.plans.pop(0) if self.plans else Plan()
        if not self.plans and self.plans_out_at is None:
            # the window to settle in starts once this call has ended: a planned call may
            # take up to 6 TTLs (there and back, then a timeout), and the retry after it
            self.last_planned_in_flight = had_plan
            if not had_plan:
                self.plans_out_at = self.now
        if plan.dropped:
            self.push(self.now + plan.to_server + plan.back + plan.timeout_ms, "fail", None)
        else:
            self.push(self.now + plan.to_server, "server", (action, plan))

    def serve(self, action: Action, plan: Plan) -> None:
        if action is Action.ACQUIRE:
            outcome = self.store.acquire(self.now)
        else:
            assert self.epoch_at_send is not None
            outcome = self.store.renew(self.now, self.epoch_at_send)
        if plan.reply_lost:
            self.push(self.now + plan.back + plan.timeout_ms, "fail", None)
        else:
            self.push(self.now + plan.back, "reply", outcome)

    def call_ended(self) -> None:
        if self.last_planned_in_flight:
            self.last_planned_in_flight = False
            self.plans_out_at = self.now

    def reply(self, outcome: Event) -> None:
        self.call_ended()
        t = self.timing
        sent, self.sent_at = self.sent_at, None
        assert sent is not None
        if isinstance(outcome, Acquired):
            event: Event = Acquired(outcome.epoch, self.now)
        elif isinstance(outcome, Renewed):
            event = Renewed(self.now)
        elif isinstance(outcome, Lost):
            event = Lost(self.now, outcome.claimed_epoch)
        else:
            assert isinstance(outcome, RenewFailed)
            event = RenewFailed(self.now, outcome.reason)
        fresh = self.now < sent + t.ttl_ms - t.margin
        same_epoch = not isinstance(outcome, Acquired) or self.m.epoch in (None, outcome.epoch)
        self.replying_sent = sent
        self.feed(event)
        self.replying_sent = None
        if isinstance(outcome, Renewed | Acquired) and fresh and same_epoch:
            self.last_ok_sent = sent

    def step(self) -> bool:
        wake = self.m.wake_at_ms
        nxt = self.queue[0][0] if self.queue else INF
        if wake is not None and wake <= nxt:
            at, kind, payload = max(wake, self.now), "tick", None
        elif self.queue:
            at, _, kind, payload = heapq.heappop(self.queue)
            at = max(at, self.now)
        else:
            return False
        self.check_interval(at)
        self.now = at
        if kind == "tick":
            self.feed(Tick(at))
        elif kind == "claim":
            self.claimed |= self.store.claim(at)
        elif kind == "server":
            assert isinstance(payload, tuple)
            self.serve(*payload)
        elif kind == "fail":
            assert self.sent_at is not None
            self.sent_at = None
            self.call_ended()
            self.feed(RenewFailed(at, FailReason.UNAVAILABLE, "timeout"))
        else:
            self.reply(payload)  # type: ignore[arg-type]
        return True

    def run(self, settle: int) -> None:
        """Until `settle` ms after the last planned call ended (then every call succeeds at
        once)."""
        steps = 0
        while (self.plans_out_at is None or self.now < self.plans_out_at + settle) \
                and self.step():
            steps += 1
            assert steps < 20_000, "the simulation does not converge"


@st.composite
def timings(draw: st.DrawFn) -> LeaseTiming:
    ttl = draw(st.integers(200, 6000))
    margin = draw(st.one_of(st.none(), st.integers(ttl // 20 + 2, ttl // 3)))
    m = default_margin_ms(ttl) if margin is None else margin
    renew = draw(st.integers(max(1, ttl // 20), ttl - m - 1))
    retry = draw(st.one_of(st.none(), st.integers(1, ttl)))
    return LeaseTiming(ttl_ms=ttl, renew_ms=max(renew, 1), margin_ms=margin, retry_ms=retry)


def plans(ttl: int) -> st.SearchStrategy[Plan]:
    delay = st.one_of(st.integers(0, 5), st.integers(0, 2 * ttl))
    return st.builds(Plan, to_server=delay, back=delay, dropped=st.booleans(),
                     reply_lost=st.booleans(), timeout_ms=delay)


@st.composite
def runs(draw: st.DrawFn) -> Run:
    timing = draw(timings())
    ttl = timing.ttl_ms
    drift = draw(st.integers(0, timing.margin - 1))  # the margin covers the clocks' difference
    horizon = 20 * ttl
    return Run(timing, Store(ttl, drift),
               plans=draw(st.lists(plans(ttl), max_size=25)),
               claims=draw(st.lists(st.integers(0, horizon), max_size=4)),
               ticks=draw(st.lists(st.integers(0, horizon), max_size=20)))


@settings(max_examples=300, deadline=None)
@given(runs())
def test_freeze_is_ordered_before_the_lease_can_expire_whatever_the_store_does(run: Run) -> None:
    run.run(settle=5 * run.timing.ttl_ms)
    for when, deadline in run.freezes:
        assert deadline is None or when <= deadline
    # Once the plans ran out the store answers at once: the keeper ends holding the lease again,
    # unless the origin was claimed, and then it ends taken over, frozen.
    if run.claimed:
        assert run.m.state is LeaseState.TAKEN_OVER and run.frozen
    elif not run.claimed:
        assert run.m.state is LeaseState.HELD and not run.frozen


@settings(max_examples=200, deadline=None)
@given(runs(), st.integers(0, 10))
def test_taken_over_never_thaws_and_stop_ends_it(run: Run, extra: int) -> None:
    run.run(settle=5 * run.timing.ttl_ms)
    if run.m.state is LeaseState.TAKEN_OVER:
        for k in range(extra):
            run.m, actions = decide(run.m, Tick(run.now + k * run.timing.ttl_ms))
            assert actions == () and run.m.state is LeaseState.TAKEN_OVER
    run.m, actions = decide(run.m, Stop())
    assert actions == () and run.m.state is LeaseState.STOPPED


def held(timing: LeaseTiming, at: int = 0) -> LeaseMachine:
    m, actions = decide(LeaseMachine(timing), Tick(at))
    assert actions == (Action.ACQUIRE,)
    m, actions = decide(m, Acquired(7, at))
    assert m.state is LeaseState.HELD and actions == ()
    return m


T = LeaseTiming(ttl_ms=3000, renew_ms=1000)


def test_renewals_are_ordered_every_renew_ms_counted_from_the_send() -> None:
    m = held(T)
    m, actions = decide(m, Tick(999))
    assert actions == ()
    m, actions = decide(m, Tick(1000))
    assert actions == (Action.RENEW,) and m.wake_at_ms == T.ttl_ms - T.margin
    m, actions = decide(m, Renewed(1400))  # the reply is slow: count from the send, 1000
    assert m.renewed_sent_ms == 1000 and m.wake_at_ms == 2000


def test_a_renewal_that_hangs_freezes_at_sent_plus_ttl_minus_margin() -> None:
    m = held(T)
    m, _ = decide(m, Tick(1000))                       # RENEW in flight, never answered
    assert m.wake_at_ms == 3000 - 300
    m, actions = decide(m, Tick(2699))
    assert actions == () and m.state is LeaseState.HELD
    m, actions = decide(m, Tick(2700))
    assert actions == (Action.FREEZE_ALL,) and m.state is LeaseState.FENCED
    m, actions = decide(m, Renewed(3900))              # it did reach the store, late: useless
    assert m.state is LeaseState.FENCED and Action.THAW_ALL not in actions
    assert actions == ()                               # retried after retry_ms
    m, actions = decide(m, Tick(3900 + T.retry))
    assert actions == (Action.RENEW,)
    m, actions = decide(m, Renewed(3950 + T.retry))
    assert actions == (Action.THAW_ALL,) and m.state is LeaseState.HELD


def test_an_expired_but_unclaimed_lease_is_taken_again_at_our_epoch_then_thawed() -> None:
    m = held(T)
    m, _ = decide(m, Tick(1000))
    m, actions = decide(m, RenewFailed(5000, FailReason.EXPIRED))
    assert actions == (Action.FREEZE_ALL, Action.ACQUIRE)
    m, actions = decide(m, Acquired(7, 5001))
    assert actions == (Action.THAW_ALL,) and m.state is LeaseState.HELD and m.epoch == 7


def test_an_acquire_at_another_epoch_is_a_take_over_and_never_thaws() -> None:
    m = held(T)
    m, _ = decide(m, Tick(1000))
    m, _ = decide(m, RenewFailed(5000, FailReason.EXPIRED))
    m, actions = decide(m, Acquired(1, 5001))          # the store lost the origin's state
    assert actions == (Action.REPORT_TAKEN_OVER,) and m.state is LeaseState.TAKEN_OVER
    assert m.claimed_epoch == 1 and m.wake_at_ms is None


def test_a_claim_seen_while_the_flows_are_open_freezes_and_reports() -> None:
    m = held(T)
    m, _ = decide(m, Tick(1000))
    m, actions = decide(m, Lost(1001, claimed_epoch=8))
    assert actions == (Action.FREEZE_ALL, Action.REPORT_TAKEN_OVER)
    assert m.state is LeaseState.TAKEN_OVER and m.claimed_epoch == 8


def test_a_failed_renewal_keeps_the_flows_open_until_the_deadline() -> None:
    m = held(T)
    m, _ = decide(m, Tick(1000))
    m, actions = decide(m, RenewFailed(1010, FailReason.UNAVAILABLE))
    assert m.state is LeaseState.RENEW_FAILING and actions == ()
    assert m.wake_at_ms == 1010 + T.retry


def test_errors_name_the_state_and_the_event() -> None:
    m = held(T)
    with pytest.raises(LeaseError, match=r"state HELD .*Renewed\(now_ms=5\).*no store call"):
        decide(m, Renewed(5))
    m, _ = decide(m, Tick(1000))
    with pytest.raises(LeaseError, match=r"state HELD .*Acquired.*in flight is RENEW"):
        decide(m, Acquired(7, 1001))
    with pytest.raises(LeaseError, match=r"state HELD .*Tick\(now_ms=3\).*time must not go"):
        decide(m, Tick(3))
    taken, _ = decide(m, Lost(1001))
    with pytest.raises(LeaseError, match=r"state TAKEN_OVER .*Renewed"):
        decide(taken, Renewed(1002))


@pytest.mark.parametrize(("ttl", "renew", "margin"), [(0, 1, None), (1000, 900, None),
                                                      (1000, 100, 1000), (1000, 100, 0)])
def test_a_timing_that_cannot_keep_the_rule_is_refused(ttl: int, renew: int,
                                                       margin: int | None) -> None:
    with pytest.raises(LeaseError):
        LeaseTiming(ttl_ms=ttl, renew_ms=renew, margin_ms=margin)


def test_the_default_margin_is_a_tenth_of_the_ttl_at_least_100_ms() -> None:
    assert LeaseTiming(ttl_ms=3000, renew_ms=1000).margin == 300
    assert LeaseTiming(ttl_ms=500, renew_ms=100).margin == 100


def test_the_table_never_thaws_outside_fenced_and_taken_over_is_final() -> None:
    for (state, signal), (after, actions) in TRANSITIONS.items():
        if Action.THAW_ALL in actions:
            assert state is LeaseState.FENCED and signal in (Signal.RENEWED, Signal.GRANTED)
        if state is LeaseState.TAKEN_OVER:
            assert after in (LeaseState.TAKEN_OVER, LeaseState.STOPPED) and actions == ()
        if Action.FREEZE_ALL in actions:
            assert state not in FROZEN
    assert {metric_name(s) for s in LeaseState} <= set(LEASE_STATES)
