"""The store across the lab: origin and standby reach Redis on the store hosts over the network.

Clients run inside the origin's and the standby's namespaces (lab.call); Redis, Sentinels and
Cluster nodes run on store, store2, store3 (ops/redislab.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from ops.lab import Lab
from ops.redislab import RedisClusterSet, RedisServer, SentinelSet
from store.acl import acl_rules
from store.client import CheckpointStore, OriginState
from store.config import Durability, StoreConfig
from store.errors import (
    ClaimLost,
    DurabilityError,
    LeaseHeld,
    LeaseLost,
    RecordBadSignature,
    StaleEpoch,
    StoreUnavailable,
    VersionNotNewer,
)
from store.keys import OriginKeys
from store.record import Checkpoint, encode
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixture)
    FailoverRun,
    keyring,
    new_keyring,
    put_through_failover,
    wait_for,
)

pytestmark = pytest.mark.lab
ORIGIN = "origin-a"


def cp(i: int, epoch: int, origin: str = ORIGIN, conn: str | None = None) -> Checkpoint:
    return Checkpoint(origin=origin, conn=conn or f"c{i}", epoch=epoch, version=i,
                      time_ns=time.time_ns(), inbound_consumed=i * 100, outbound_produced=i,
                      ici=b"ici%d" % i, app_state=b"state-%d" % i, send_queue=b"q" * (i % 50))


def test_partitioned_origin_cannot_renew_and_is_fenced_by_the_standby_claim(
        lab: Lab, redis_factory: Callable[..., RedisServer],
        keyring: KeyRing) -> None:  # noqa: F811
    srv = redis_factory("store")
    config = StoreConfig.standalone(srv.url, socket_timeout_s=0.5, connect_timeout_s=0.5)
    origin = lab.call("origin", CheckpointStore.connect, config, keyring)
    standby = lab.call("standby", CheckpointStore.connect, config, keyring)
    try:
        epoch = lab.call("origin", origin.lease_acquire, ORIGIN, ORIGIN, 1500)
        first = cp(1, epoch)
        lab.call("origin", origin.put, first)
        lab.partition("origin", ["store"])
        with pytest.raises(StoreUnavailable):
            lab.call("origin", origin.lease_renew, ORIGIN, ORIGIN, epoch, 1500)
        state: OriginState = lab.call("standby", standby.state, ORIGIN)
        assert state.lease_holder == ORIGIN
        with pytest.raises(LeaseHeld):
            lab.call("standby", standby.claim, ORIGIN, "standby", state.epoch, 5000)
        wait_for(lambda: lab.call("standby", standby.state, ORIGIN).lease_holder is None, 3,
                 "the origin's lease to expire")
        new_epoch = lab.call("standby", standby.claim, ORIGIN, "standby", state.epoch, 5000)
        assert new_epoch == epoch + 1
        (read,) = list(lab.call("standby", lambda: list(standby.records(ORIGIN))))
        assert read.error is None and read.checkpoint == first
        lab.heal()
        with pytest.raises(StaleEpoch):  # the origin comes back: every write is refused
            lab.call("origin", origin.put, cp(2, epoch))
        with pytest.raises(StaleEpoch):
            lab.call("origin", origin.lease_renew, ORIGIN, ORIGIN, epoch, 1500)
    finally:
        lab.heal()
        origin.close()
        standby.close()


def _sentinel_master(sentinels: SentinelSet) -> set[tuple[str, int]]:
    return {sentinels.primary_address(via=i) for i in range(len(sentinels.sentinels))}


def _sentinels_know_each_other(lab: Lab, sentinels: SentinelSet) -> bool:
    for s in sentinels.sentinels:
        def others(s=s) -> int:  # type: ignore[no-untyped-def]
            c = s.client()
            try:
                return int(c.execute_command("SENTINEL", "MASTER", sentinels.service)
                           [b"num-other-sentinels"])
            finally:
                c.close()
        if lab.call(s.host, others) != len(sentinels.sentinels) - 1:
            return False
    return True


def test_every_acknowledged_put_survives_a_primary_crash_and_failover_in_the_lab(
        lab: Lab, redis_factory: Callable[..., RedisServer],
        keyring: KeyRing) -> None:  # noqa: F811
    primary = redis_factory("store", repl_diskless_sync_delay="0")
    replica = redis_factory("store2", replicaof=primary)
    sentinels = SentinelSet(lab, primary, ["store", "store2", "store3"], service="tcpcp-lab",
                            down_after_ms=1000).start()
    try:
        wait_for(lambda: _sentinels_know_each_other(lab, sentinels), 30, "sentinel discovery")

        def replica_acks() -> bool:
            c = primary.client()
            try:
                c.set("probe", 1)
                return int(c.wait(1, 100)) == 1
            finally:
                c.close()
        wait_for(lambda: lab.call("store", replica_acks), 15, "replica acknowledging")
        config = StoreConfig.sentinel(sentinels.service, sentinels.addresses,
                                      durability=Durability.parse("wait:1:500"),
                                      connect_timeout_s=0.5, socket_timeout_s=1.0)
        old = (primary.addr, primary.port)
        new = (replica.addr, replica.port)

        def scenario() -> FailoverRun:
            with CheckpointStore.connect(config, keyring) as store:
                epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=600_000)
                # The crashed primary stays down; a fresh, empty replica joins (for WAIT 1)
                # that is never elected (replica-priority 0): a failover to an empty server
                # wipes every replica. Restarting the old primary empty did that when the
                # loaded machine made Sentinels think `new` down.
                return put_through_failover(
                    store, lambda i: cp(i, epoch), crash=primary.kill,
                    failed_over=lambda: _sentinel_master(sentinels) == {new},
                    after_failover=lambda: redis_factory("store3", replicaof=replica,
                                                         replica_priority="0"),
                    deadline_s=90)

        run = lab.call("origin", scenario)
        acknowledged = run.acknowledged
        assert _sentinel_master(sentinels) == {new} and new != old
        assert run.failed_over_at is not None and run.failed_over_at > 300 and run.refused
        assert len([c for c in acknowledged if c.version < 300]) == 299

        def read_all() -> dict[str, object]:
            with CheckpointStore.connect(config, keyring) as reader:
                return {r.conn: r for r in reader.records(ORIGIN)}
        stored = lab.call("standby", read_all)
        for written in acknowledged:
            got = stored[written.conn]
            assert got.error is None and got.checkpoint == written  # type: ignore[attr-defined]
    finally:
        sentinels.stop()


def test_cluster_of_three_primaries_serves_origins_on_different_nodes_in_the_lab(
        lab: Lab, keyring: KeyRing) -> None:  # noqa: F811
    cluster = RedisClusterSet(lab, ["store", "store2", "store3"], base_port=7100).start()
    try:
        config = StoreConfig.cluster(cluster.nodes[0].url)

        def scenario() -> dict[str, str]:
            placed: dict[str, str] = {}
            with CheckpointStore.connect(config, keyring) as store:
                rc = store._router.cluster  # type: ignore[attr-defined]
                for i in range(1000):
                    origin = f"origin-{i}"
                    node = rc.get_node_from_key(OriginKeys(origin).meta)
                    placed.setdefault(node.host, origin)
                    if len(placed) == 3:
                        break
                for origin in placed.values():
                    epoch = store.lease_acquire(origin, origin, ttl_ms=5000)
                    store.put_many([cp(v, epoch, origin, conn=f"c{v % 5}") for v in range(1, 11)])
                    got = store.get(origin, "c3")
                    assert got is not None and (got.version, got.origin) == (8, origin)
                    assert store.connections(origin) == {f"c{v}": v + 5 for v in range(5)} | {
                        "c0": 10}
                    store.lease_release(origin, origin, epoch)
                    new_epoch = store.claim(origin, "standby", epoch, ttl_ms=5000)
                    with pytest.raises((ClaimLost, LeaseHeld)):
                        store.claim(origin, "standby-2", epoch, ttl_ms=5000)
                    with pytest.raises(StaleEpoch):
                        store.put(cp(11, epoch, origin, conn="c1"))
                    assert new_epoch == epoch + 1
                assert set(placed.values()) <= set(store.origins())
            return placed

        placed = lab.call("origin", scenario)
        assert set(placed) == {lab.addr(h) for h in ("store", "store2", "store3")}
    finally:
        cluster.stop()


def test_claimers_on_two_hosts_exactly_one_wins_in_100_repetitions(
        lab: Lab, redis_factory: Callable[..., RedisServer],
        keyring: KeyRing) -> None:  # noqa: F811
    srv = redis_factory("store")
    config = StoreConfig.standalone(srv.url)
    claimers = {"standby": lab.call("standby", CheckpointStore.connect, config, keyring),
                "store3": lab.call("store3", CheckpointStore.connect, config, keyring)}
    try:
        for rep in range(100):
            origin = f"origin-{rep}"
            store = claimers["standby"]
            epoch = lab.call("standby", store.lease_acquire, origin, origin, 5000)
            lab.call("standby", store.lease_release, origin, origin, epoch)
            barrier = threading.Barrier(2)

            def claim(host: str, origin: str = origin, epoch: int = epoch,
                      barrier: threading.Barrier = barrier) -> int | Exception:
                barrier.wait()
                try:
                    return claimers[host].claim(origin, host, epoch, ttl_ms=5000)
                except (ClaimLost, LeaseHeld) as exc:
                    return exc

            futures = {h: lab.submit(h, claim, h) for h in claimers}
            results = {h: f.result(timeout=10) for h, f in futures.items()}
            winners = [h for h, r in results.items() if isinstance(r, int)]
            assert len(winners) == 1, f"repetition {rep}: {results}"
            state = lab.call("standby", store.state, origin)
            assert (state.owner, state.epoch) == (winners[0], epoch + 1)
    finally:
        for s in claimers.values():
            s.close()


def test_wait_1_put_from_the_origin_fails_within_the_timeout_when_the_replica_stops(
        lab: Lab, redis_factory: Callable[..., RedisServer],
        keyring: KeyRing) -> None:  # noqa: F811
    primary = redis_factory("store", repl_diskless_sync_delay="0")
    replica = redis_factory("store2", replicaof=primary)
    config = StoreConfig.standalone(primary.url, durability=Durability.parse("wait:1:400"))

    def scenario() -> tuple[float, str]:
        with CheckpointStore.connect(config, keyring) as store:
            wait_for(lambda: _try_acquire(store), 15, "a durable lease (replica acknowledging)")
            epoch = store.state(ORIGIN).epoch
            store.put(cp(1, epoch))
            replica.stop()
            started = time.monotonic()
            try:
                store.put(cp(2, epoch))
            except DurabilityError as exc:
                return time.monotonic() - started, str(exc)
            return time.monotonic() - started, "put succeeded"

    elapsed, message = lab.call("origin", scenario)
    assert "needed 1 replica(s) within 400 ms (WAIT), got 0" in message
    assert 0.39 <= elapsed < 0.4 + 1.0, f"put took {elapsed:.3f} s with a 0.4 s timeout"


def _try_acquire(store: CheckpointStore) -> bool:
    try:
        store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=600_000)
        return True
    except DurabilityError:
        return False


def test_least_privilege_user_runs_the_whole_failover_path_across_the_lab(
        lab: Lab, redis_factory: Callable[..., RedisServer],
        keyring: KeyRing) -> None:  # noqa: F811
    """Origin and standby as the ACL user: versions only move forward, the lease expires
    exactly at its TTL as seen from the standby, the claim fences the origin, and a forged
    record is refused while the genuine one is restored."""
    srv = redis_factory("store")

    def admin(*command: object) -> object:
        c = srv.client()
        try:
            return c.execute_command(*command)
        finally:
            c.close()
    lab.call("store", admin, "ACL", "SETUSER", "tcpcp", "reset", "on", ">pw", *acl_rules())
    config = StoreConfig.standalone(srv.url, username="tcpcp", password="pw")
    origin = lab.call("origin", CheckpointStore.connect, config, keyring)
    standby = lab.call("standby", CheckpointStore.connect, config, keyring)
    try:
        ttl_s = 0.8
        started = time.monotonic()
        epoch = lab.call("origin", origin.lease_acquire, ORIGIN, ORIGIN, int(ttl_s * 1000))
        acquired = time.monotonic()
        newest = cp(5, epoch, conn="c1")
        lab.call("origin", origin.put, newest)
        for older in (5, 4, 1):
            with pytest.raises(VersionNotNewer, match="above the stored 5"):
                lab.call("origin", origin.put, cp(older, epoch, conn="c1"))

        def watch_lease() -> list[tuple[float, float, bool]]:
            """(before, after, held) of each state() call until one finds the lease gone."""
            polls: list[tuple[float, float, bool]] = []
            while not polls or polls[-1][2]:
                t0 = time.monotonic()
                holder = standby.state(ORIGIN).lease_holder
                polls.append((t0, time.monotonic(), holder is not None))
                assert holder in (None, ORIGIN)
                assert polls[-1][1] - started < ttl_s + 2, "the lease outlived its TTL by 2 s"
                time.sleep(0.005)
            return polls
        # Redis reads the lease at an instant between a call's before and after, and the lease
        # ends between started + TTL and acquired + TTL (1 ms: Redis's clock resolution)
        polls = lab.call("standby", watch_lease)
        for t0, t1, held in polls:
            if held:
                assert t0 < acquired + ttl_s + 0.001, f"lease live {t0 - acquired:.3f} s later"
            else:
                assert t1 > started + ttl_s - 0.001, f"lease gone after {t1 - started:.3f} s"
        assert len(polls) > 1, "the lease was never seen live"
        with pytest.raises(LeaseLost, match="expired or taken"):
            lab.call("origin", origin.lease_renew, ORIGIN, ORIGIN, epoch, 800)
        new_epoch = lab.call("standby", standby.claim, ORIGIN, "standby", epoch, 5000)
        assert new_epoch == epoch + 1
        with pytest.raises(StaleEpoch):
            lab.call("origin", origin.lease_renew, ORIGIN, ORIGIN, epoch, 800)
        with pytest.raises(StaleEpoch):
            lab.call("origin", origin.put, cp(6, epoch, conn="c1"))
        forged = encode(cp(9, new_epoch, conn="c2"), new_keyring())
        lab.call("store", admin, "HSET", OriginKeys(ORIGIN).records, "c2", forged)
        results = {r.conn: r for r in lab.call("standby", lambda: list(standby.records(ORIGIN)))}
        assert results["c1"].error is None and results["c1"].checkpoint == newest
        assert isinstance(results["c2"].error, RecordBadSignature)
    finally:
        origin.close()
        standby.close()
