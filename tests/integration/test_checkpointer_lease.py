"""checkpointer.leaseloop.LeaseKeeper against real redis-server processes (local, no lab).

The freeze_all / thaw_all callables here are plain functions that record when they were called;
the daemon wires the ACK gate's real freeze later. Times are time.monotonic(), the keeper's clock.
The renewals' send times are recorded by a CheckpointStore subclass around the real calls, so the
freeze is measured against what was really sent, not against the keeper's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from checkpointer.lease import LeaseState, LeaseTiming
from checkpointer.leaseloop import LeaseKeeper
from checkpointer.metrics import CheckpointerMetrics, Registry
from ops.wait import wait_until
from store.client import CheckpointStore
from store.config import StoreConfig
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    keyring,
    redis_server,
)

ORIGIN = "origin-lease"
TTL_MS = 1000
TIMING = LeaseTiming(ttl_ms=TTL_MS, renew_ms=300)  # margin: max(TTL/10, 100 ms) = 100 ms


class RecordingStore(CheckpointStore):
    """The real store; remembers when each successful renewal (or acquire) was sent."""

    ok_sent: list[float]
    tried: list[float]  # every acquire sent, successful or not

    def lease_acquire(self, origin: str, holder: str, ttl_ms: int) -> int:
        sent = time.monotonic()
        self.tried.append(sent)
        epoch = super().lease_acquire(origin, holder, ttl_ms)
        self.ok_sent.append(sent)
        return epoch

    def lease_renew(self, origin: str, holder: str, epoch: int, ttl_ms: int) -> None:
        sent = time.monotonic()
        super().lease_renew(origin, holder, epoch, ttl_ms)
        self.ok_sent.append(sent)


@dataclass
class Flows:
    """Stands in for the ACK gate: records freeze_all / thaw_all calls."""

    calls: list[tuple[str, float]] = field(default_factory=list)

    def freeze_all(self) -> None:
        self.calls.append(("freeze", time.monotonic()))

    def thaw_all(self) -> None:
        self.calls.append(("thaw", time.monotonic()))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Partition:
    """A TCP proxy to Redis that can stop forwarding (both ways): the origin cut off from the
    store while other clients still reach it."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.open = threading.Event()
        self.open.set()
        self.closed = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            while not self.closed:
                self.open.wait()
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                self.open.wait()  # held while partitioned
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.open.set()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def keeper_on(url: str, keyring: KeyRing,  # noqa: F811
              flows: Flows) -> Iterator[tuple[LeaseKeeper, RecordingStore,
                                                         CheckpointerMetrics]]:
    config = StoreConfig.standalone(url, socket_timeout_s=0.5, connect_timeout_s=0.5)
    store = RecordingStore.connect(config, keyring)
    assert isinstance(store, RecordingStore)
    store.ok_sent, store.tried = [], []
    metrics = CheckpointerMetrics.register(Registry())
    keeper = LeaseKeeper(store, origin=ORIGIN, holder="host-a", timing=TIMING,
                         freeze_all=flows.freeze_all, thaw_all=flows.thaw_all, metrics=metrics)
    try:
        with keeper:
            assert keeper.wait_held(5), f"lease not held: {keeper.state}"
            yield keeper, store, metrics
    finally:
        store.close()


@pytest.fixture
def admin(redis_server: LocalRedis, keyring: KeyRing) -> Iterator[CheckpointStore]:  # noqa: F811
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring) as s:
        yield s


def lease_state(metrics: CheckpointerMetrics) -> str:
    return next(name for name in ("held", "renewing", "lost", "fenced", "taken_over")
                if metrics.lease_state.value(state=name) == 1)


def test_keeper_holds_the_lease_alive_over_three_ttls(
        redis_server: LocalRedis, keyring: KeyRing, admin: CheckpointStore) -> None:  # noqa: F811
    flows = Flows()
    with keeper_on(redis_server.url, keyring, flows) as (keeper, store, metrics):
        assert lease_state(metrics) == "held"
        end = time.monotonic() + 3 * TTL_MS / 1000
        while time.monotonic() < end:
            seen = admin.state(ORIGIN)
            assert seen.lease_holder == "host-a" and seen.owner == "host-a"
            assert seen.lease_ms_left is not None and seen.lease_ms_left > 0
            assert seen.epoch == keeper.epoch == 1
            time.sleep(0.05)
        assert len(store.ok_sent) >= 3 * TTL_MS // TIMING.renew_ms - 1
        assert keeper.state is LeaseState.HELD and flows.calls == []
    assert keeper.state is LeaseState.STOPPED


@pytest.mark.parametrize("outage_ttls", [0.0, 2.0],
                         ids=["lease_still_live", "lease_expired_unclaimed"])
def test_stopped_redis_freezes_before_the_ttl_and_thaws_when_it_returns(
        redis_server: LocalRedis, keyring: KeyRing, outage_ttls: float) -> None:  # noqa: F811
    flows = Flows()
    proc = redis_server.proc
    assert proc is not None
    with keeper_on(redis_server.url, keyring, flows) as (keeper, store, metrics):
        wait_until(lambda: len(store.ok_sent) >= 2, 5, what="the lease renewed once")
        proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: "freeze" in flows.names(), 3 * TTL_MS / 1000,
                       what="freeze_all called")
            frozen_at = flows.calls[0][1]
            last_ok = max(t for t in store.ok_sent if t < frozen_at)
            assert frozen_at - last_ok < TTL_MS / 1000, "froze after the lease could expire"
            assert frozen_at - last_ok < (TTL_MS - TIMING.margin) / 1000 + 0.05
            assert keeper.state is LeaseState.FENCED and lease_state(metrics) == "fenced"
            time.sleep(outage_ttls * TTL_MS / 1000)
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_until(lambda: keeper.state is LeaseState.HELD, 5, what="keeper holding again")
        assert flows.names() == ["freeze", "thaw"]
        assert keeper.epoch == 1 and lease_state(metrics) == "held"


def test_a_claim_during_a_partition_leaves_the_keeper_taken_over_and_frozen(
        redis_server: LocalRedis, keyring: KeyRing, admin: CheckpointStore) -> None:  # noqa: F811
    flows = Flows()
    partition = Partition(redis_server.port)
    try:
        with keeper_on(f"redis://127.0.0.1:{partition.port}", keyring, flows) as (
                keeper, store, metrics):
            partition.open.clear()
            wait_until(lambda: "freeze" in flows.names(), 3 * TTL_MS / 1000,
                       what="freeze_all called")
            frozen_at = flows.calls[0][1]
            assert frozen_at - max(t for t in store.ok_sent if t < frozen_at) < TTL_MS / 1000

            def claimed() -> int:
                seen = admin.state(ORIGIN)
                assert seen.lease_ms_left is None, "lease still live"
                return admin.claim(ORIGIN, "standby-b", seen.epoch, ttl_ms=60_000)

            new_epoch = wait_until(claimed, 5, what="standby claims the expired lease")
            assert new_epoch == 2
            partition.open.set()
            wait_until(lambda: keeper.state is LeaseState.TAKEN_OVER, 5,
                       what="keeper sees the take-over")
            assert keeper.machine.claimed_epoch == 2 and lease_state(metrics) == "taken_over"
            time.sleep(2 * TTL_MS / 1000)
            assert keeper.state is LeaseState.TAKEN_OVER and flows.names() == ["freeze"]
            seen = admin.state(ORIGIN)
            assert (seen.owner, seen.lease_holder, seen.epoch) == ("standby-b", "standby-b", 2)
    finally:
        partition.close()


def test_a_standby_keeper_waits_for_the_claim_made_for_it_and_then_holds_the_claimed_epoch(
        redis_server: LocalRedis, keyring: KeyRing, admin: CheckpointStore) -> None:  # noqa: F811
    """The standby's checkpointer (checkpointer --standby): while the origin's own keeper holds
    the lease, and after it expired unclaimed, the standby keeper keeps waiting (never taken
    over, nothing frozen); once a resurrector claims the origin for its holder it holds the lease
    at the claimed epoch. A plain keeper in its place ends taken over at once."""
    flows, standby_flows = Flows(), Flows()
    config = StoreConfig.standalone(redis_server.url, socket_timeout_s=0.5,
                                    connect_timeout_s=0.5)
    with keeper_on(redis_server.url, keyring, flows) as (origin_keeper, _, _), \
            RecordingStore.connect(config, keyring) as store:
        assert isinstance(store, RecordingStore)
        store.ok_sent, store.tried = [], []
        plain = LeaseKeeper(store, origin=ORIGIN, holder="checkpointer@sb", timing=TIMING,
                            freeze_all=lambda: None, thaw_all=lambda: None)
        with plain:
            wait_until(lambda: plain.state is LeaseState.TAKEN_OVER, 5,
                       what="a plain keeper taken over by the live lease")
        standby = LeaseKeeper(store, origin=ORIGIN, holder="checkpointer@sb",
                              timing=TIMING, freeze_all=standby_flows.freeze_all,
                              thaw_all=standby_flows.thaw_all, standby=True)
        store.tried.clear()  # the plain keeper's attempt is not the standby's
        with standby:
            # its retries meet the live lease: after three of them it must still be waiting
            wait_until(lambda: len(store.tried) >= 3, 5, what="three acquires refused")
            assert standby.state is LeaseState.ACQUIRING
            origin_keeper.stop()  # the origin dies: its lease runs out, unclaimed
            wait_until(lambda: admin.state(ORIGIN).lease_ms_left is None, 3,
                       what="the origin's lease expired")
            tried = len(store.tried)  # its retries now meet an owner that is not it
            wait_until(lambda: len(store.tried) >= tried + 2, 5,
                       what="two acquires refused after the expiry")
            assert standby.state is LeaseState.ACQUIRING
            seen = admin.state(ORIGIN)
            epoch = admin.claim(ORIGIN, "checkpointer@sb", seen.epoch, ttl_ms=TTL_MS)
            assert standby.wait_held(5), standby.state
            assert standby.epoch == epoch == seen.epoch + 1
            # it renews: the claim's short TTL is kept alive past two TTLs of renewals
            renewed = len(store.ok_sent)
            wait_until(lambda: len(store.ok_sent) >= renewed + 2 * TTL_MS // TIMING.renew_ms,
                       10, what="the standby keeper renewing the claimed lease")
            state = admin.state(ORIGIN)
            assert (state.owner, state.lease_holder, state.epoch) == (
                "checkpointer@sb", "checkpointer@sb", epoch)
            assert state.lease_ms_left is not None
        assert standby_flows.calls == []
