"""LeaseKeeper: the thin shell that runs checkpointer.lease's machine against a CheckpointStore.

Two threads. The keeper's loop owns the machine: it feeds it Ticks at wake_at_ms and the store's
replies, and runs FREEZE_ALL / THAW_ALL itself, at once, so a store call that hangs never delays a
freeze. A caller thread makes the store calls (one at a time) and posts their outcome back.

    keeper = LeaseKeeper(store, origin="origin-a", holder="origin-a",
                         timing=LeaseTiming(ttl_ms=3000, renew_ms=1000),
                         freeze_all=gate.freeze_all, thaw_all=gate.thaw_all, metrics=metrics)
    with keeper:                       # start(); stop() on the way out
        keeper.wait_held(timeout_s=5)  # open nothing guarded before the lease is held
        ...

Stopping leaves the flows as they are and does not release the lease. The store is the
caller's: the keeper never closes it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from checkpointer.lease import (
    Acquired,
    Action,
    Event,
    FailReason,
    LeaseMachine,
    LeaseState,
    LeaseTiming,
    Lost,
    Renewed,
    RenewFailed,
    Stop,
    Tick,
    decide,
    metric_name,
)
from checkpointer.metrics import CheckpointerMetrics
from store.client import CheckpointStore
from store.errors import LeaseHeld, LeaseLost, NotOwner, StaleEpoch, StoreError

log = structlog.get_logger(component="tcpcp.checkpointer.lease")


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class _Call:
    action: Action
    epoch: int | None


class LeaseKeeper:
    """Keeps the origin's lease; freezes every guarded flow before it could expire elsewhere."""

    def __init__(self, store: CheckpointStore, *, origin: str, holder: str, timing: LeaseTiming,
                 freeze_all: Callable[[], object], thaw_all: Callable[[], object],
                 metrics: CheckpointerMetrics | None = None,
                 clock: Callable[[], int] = monotonic_ms, standby: bool = False) -> None:
        """standby: until the lease is first held, another holder's lease or ownership means
        "not claimed for us yet" (keep asking) instead of "taken over" (frozen for good)."""
        self._store = store
        self._standby = standby
        self._waiting_logged = False
        self._origin = origin
        self._holder = holder
        self._freeze_all = freeze_all
        self._thaw_all = thaw_all
        self._metrics = metrics
        self._clock = clock
        self._machine = LeaseMachine(timing)
        self._events: queue.Queue[Event] = queue.Queue()
        self._calls: queue.Queue[_Call | None] = queue.Queue()
        self._changed = threading.Condition()
        self._loop: threading.Thread | None = None
        self._caller: threading.Thread | None = None
        self._log = log.bind(origin=origin, holder=holder, ttl_ms=timing.ttl_ms,
                             renew_ms=timing.renew_ms, margin_ms=timing.margin)
        self._publish()

    # -- what the daemon reads --

    @property
    def machine(self) -> LeaseMachine:
        return self._machine

    @property
    def state(self) -> LeaseState:
        return self._machine.state

    @property
    def epoch(self) -> int | None:
        """The epoch to write with (None before the lease was first acquired)."""
        return self._machine.epoch

    def wait_for(self, states: set[LeaseState], timeout_s: float) -> LeaseState:
        """Block until the keeper is in one of `states` (or the timeout ran out); the state."""
        with self._changed:
            self._changed.wait_for(lambda: self._machine.state in states, timeout_s)
            return self._machine.state

    def wait_held(self, timeout_s: float) -> bool:
        return self.wait_for({LeaseState.HELD}, timeout_s) is LeaseState.HELD

    # -- life cycle --

    def start(self) -> LeaseKeeper:
        if self._loop is not None:
            raise RuntimeError(f"lease keeper of {self._origin!r} already started")
        self._loop = threading.Thread(target=self._run, name=f"lease-{self._origin}",
                                      daemon=True)
        self._caller = threading.Thread(target=self._call_store,
                                        name=f"lease-store-{self._origin}", daemon=True)
        self._caller.start()
        self._loop.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop both threads. A store call in flight is left to finish on its own (its thread is
        a daemon): it cannot change anything any more."""
        if self._loop is None:
            return
        self._events.put(Stop())
        self._loop.join(timeout_s)
        self._calls.put(None)
        if self._caller is not None:
            self._caller.join(timeout_s)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop --

    def _run(self) -> None:
        try:
            self._loop_events()
        except Exception as exc:
            self._log.critical("lease_keeper_crashed", error=f"{type(exc).__name__}: {exc}",
                               exc_info=True)
            raise

    def _loop_events(self) -> None:
        self._feed(Tick(self._clock()))
        while self._machine.state is not LeaseState.STOPPED:
            wake = self._machine.wake_at_ms
            wait_s = None if wake is None else max(0.0, (wake - self._clock()) / 1000)
            try:
                event = self._events.get(timeout=wait_s)
            except queue.Empty:
                event = Tick(self._clock())
            self._feed(event)

    def _feed(self, event: Event) -> None:
        before = self._machine
        machine, actions = decide(before, event)
        with self._changed:
            self._machine = machine
            self._changed.notify_all()
        for action in actions:
            self._run_action(action, before, event)
        if machine.state is not before.state:
            self._publish()
            self._log.info("lease_state", was=before.state.value, now=machine.state.value,
                           epoch=machine.epoch, trigger=type(event).__name__)

    def _run_action(self, action: Action, before: LeaseMachine, event: Event) -> None:
        m = self._machine
        if action is Action.FREEZE_ALL:
            self._log.error("lease_fenced_freezing_all", epoch=m.epoch, was=before.state.value,
                            renewed_sent_ms=m.renewed_sent_ms, deadline_ms=m.deadline_ms,
                            now_ms=m.now_ms, trigger=repr(event))
            self._guarded(self._freeze_all, "freeze_all")
        elif action is Action.THAW_ALL:
            self._log.warning("lease_recovered_thawing_all", epoch=m.epoch)
            self._guarded(self._thaw_all, "thaw_all")
        elif action is Action.REPORT_TAKEN_OVER:
            self._log.error("origin_taken_over", epoch=m.epoch, claimed_epoch=m.claimed_epoch,
                            trigger=repr(event), frozen="for good")
        else:
            self._calls.put(_Call(action, m.epoch))

    def _guarded(self, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except Exception as exc:  # the keeper must go on: log it as loudly as we can
            self._log.error(f"{what}_failed", error=f"{type(exc).__name__}: {exc}",
                            exc_info=True)

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.set_lease_state(metric_name(self._machine.state))

    # -- the store calls --

    def _call_store(self) -> None:
        while (call := self._calls.get()) is not None:
            self._events.put(self._outcome(call))

    def _outcome(self, call: _Call) -> Event:
        ttl = self._machine.timing.ttl_ms
        try:
            if call.action is Action.ACQUIRE:
                epoch = self._store.lease_acquire(self._origin, self._holder, ttl_ms=ttl)
                return Acquired(epoch, self._clock())
            assert call.epoch is not None, "a renewal needs the epoch acquired before"
            self._store.lease_renew(self._origin, self._holder, call.epoch, ttl_ms=ttl)
            return Renewed(self._clock())
        except LeaseLost as exc:  # renew only: the epoch check passed, so nobody claimed yet
            return RenewFailed(self._clock(), FailReason.EXPIRED, str(exc))
        except (StaleEpoch, NotOwner, LeaseHeld) as exc:
            if self._standby and call.action is Action.ACQUIRE and call.epoch is None \
                    and not isinstance(exc, StaleEpoch):
                return self._still_waiting(exc)
            self._log.error("lease_claimed_by_another", error=f"{type(exc).__name__}: {exc}")
            return Lost(self._clock(), self._claimed_epoch(exc))
        except StoreError as exc:
            self._log.warning("lease_call_failed", call=call.action.value,
                              error=f"{type(exc).__name__}: {exc}")
            return RenewFailed(self._clock(), FailReason.UNAVAILABLE, str(exc))
        except Exception as exc:  # a bug below us must not leave the machine waiting forever
            self._log.error("lease_call_crashed", call=call.action.value,
                            error=f"{type(exc).__name__}: {exc}", exc_info=True)
            return RenewFailed(self._clock(), FailReason.UNAVAILABLE, repr(exc))

    def _still_waiting(self, exc: StoreError) -> Event:
        """A standby's keeper before its first lease: the origin is still another holder's."""
        if not self._waiting_logged:
            self._waiting_logged = True
            self._log.info("standby_waiting_for_claim", error=f"{type(exc).__name__}: {exc}")
        return RenewFailed(self._clock(), FailReason.UNAVAILABLE,
                           f"not claimed for {self._holder} yet: {exc}")

    def _claimed_epoch(self, exc: StoreError) -> int | None:
        if isinstance(exc, StaleEpoch):
            return exc.current
        with contextlib.suppress(StoreError):
            return self._store.state(self._origin).epoch
        return None
