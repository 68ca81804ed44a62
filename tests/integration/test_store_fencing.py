"""Fenced writes, versions, leases and claims against a real redis-server (standalone)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from ops.wait import wait_until
from store.client import LIBRARY_SOURCE, LIBRARY_VERSION, CheckpointStore, OriginState
from store.config import Durability, StoreConfig
from store.errors import (
    ClaimLost,
    DurabilityUnsupported,
    EpochExhausted,
    LeaseHeld,
    LeaseLost,
    LibraryVersionError,
    NotOwner,
    StaleEpoch,
    StoreUnavailable,
    TooManyRecords,
    VersionNotNewer,
)
from store.limits import Limits
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    free_port,
    keyring,
    redis_server,
)

ORIGIN = "origin-a"


def cp(conn: str = "c1", *, epoch: int, version: int, origin: str = ORIGIN,
       payload: bytes = b"state") -> Checkpoint:
    return Checkpoint(origin=origin, conn=conn, epoch=epoch, version=version,
                      time_ns=time.time_ns(), inbound_consumed=version % 1000 * 10,
                      outbound_produced=version % 1000 * 20, ici=b"ici-" + conn.encode(),
                      app_state=payload, send_queue=b"unacked")


@pytest.fixture
def store(redis_server: LocalRedis, keyring: KeyRing) -> Iterator[CheckpointStore]:  # noqa: F811
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring) as s:
        yield s


def test_put_then_get_returns_the_verified_checkpoint(store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    written = cp(epoch=epoch, version=1)
    store.put(written)
    assert store.get(ORIGIN, "c1") == written
    assert store.get(ORIGIN, "absent") is None
    assert store.connections(ORIGIN) == {"c1": 1}
    assert store.origins() == [ORIGIN]


def test_write_carrying_a_stale_epoch_is_refused_after_a_claim(store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.put(cp(epoch=epoch, version=1))
    store.lease_release(ORIGIN, "origin-a", epoch)
    new_epoch = store.claim(ORIGIN, "standby-1", seen_epoch=epoch, ttl_ms=5000)
    assert new_epoch == epoch + 1
    with pytest.raises(StaleEpoch, match=f"current epoch {new_epoch}, got {epoch}") as info:
        store.put(cp(epoch=epoch, version=2, payload=b"late write from the fenced origin"))
    assert (info.value.given, info.value.current) == (epoch, new_epoch)
    with pytest.raises(StaleEpoch):
        store.delete(ORIGIN, epoch, ["c1"])
    got = store.get(ORIGIN, "c1")
    assert got is not None and got.version == 1 and got.app_state == b"state"


def test_writes_to_an_origin_nobody_has_leased_are_refused(store: CheckpointStore) -> None:
    with pytest.raises(NotOwner, match=r"must have an owner.*got none at epoch 0"):
        store.put(cp(epoch=0, version=1))
    with pytest.raises(NotOwner):
        store.put_many([cp(f"c{i}", epoch=0, version=1) for i in range(3)])
    with pytest.raises(NotOwner):
        store.delete(ORIGIN, 0, ["c1"])
    with pytest.raises(StaleEpoch, match="current epoch 0, got 1"):
        store.put(cp(epoch=1, version=1))
    assert store.connections(ORIGIN) == {} and store.state(ORIGIN).epoch == 0
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.put(cp(epoch=epoch, version=1))
    assert store.connections(ORIGIN) == {"c1": 1}


def test_older_or_equal_version_never_replaces_a_newer_one(store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.put(cp(epoch=epoch, version=5, payload=b"v5"))
    for older in (5, 4, 0):
        with pytest.raises(VersionNotNewer, match="above the stored 5") as info:
            store.put(cp(epoch=epoch, version=older, payload=b"older"))
        assert info.value.stored == 5
    store.put(cp(epoch=epoch, version=2**64 - 1, payload=b"max"))  # u64 compared exactly
    with pytest.raises(VersionNotNewer):
        store.put(cp(epoch=epoch, version=2**64 - 2, payload=b"older"))
    got = store.get(ORIGIN, "c1")
    assert got is not None and got.app_state == b"max"


def test_put_many_stores_each_record_on_its_own_merit(store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.put(cp("c3", epoch=epoch, version=9))
    outcomes = store.put_many([cp(f"c{i}", epoch=epoch, version=3) for i in range(200)], batch=16)
    refused = {o.conn: o.error for o in outcomes if o.error is not None}
    assert list(refused) == ["c3"] and isinstance(refused["c3"], VersionNotNewer)
    assert len(store.connections(ORIGIN)) == 200
    assert sum(1 for r in store.records(ORIGIN, count=7) if r.checkpoint is not None) == 200


def test_delete_removes_closed_connections_and_their_versions(store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.put_many([cp(f"c{i}", epoch=epoch, version=1) for i in range(5)])
    assert store.delete(ORIGIN, epoch, ["c0", "c1", "gone"]) == 2
    assert list(store.connections(ORIGIN)) == ["c2", "c3", "c4"]
    store.put(cp("c0", epoch=epoch, version=1))  # a new connection on the same 4-tuple


def test_origin_never_holds_more_than_its_record_limit(redis_server: LocalRedis,  # noqa: F811
                                                       keyring: KeyRing) -> None:  # noqa: F811
    config = StoreConfig.standalone(redis_server.url, limits=Limits(max_records_per_origin=3))
    with CheckpointStore.connect(config, keyring) as store:
        epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
        store.put_many([cp(f"c{i}", epoch=epoch, version=1) for i in range(3)])
        with pytest.raises(TooManyRecords, match="at most 3 records"):
            store.put(cp("c9", epoch=epoch, version=1))
        store.put(cp("c1", epoch=epoch, version=2))  # existing connections still update


def _race(stores: dict[str, CheckpointStore], origin: str, seen: int) -> dict[str, object]:
    """Let each named store claim `origin` at the same instant; name -> epoch or refusal."""
    barrier = threading.Barrier(len(stores))
    results: dict[str, object] = {}

    def claim(name: str, store: CheckpointStore) -> None:
        barrier.wait()
        try:
            results[name] = store.claim(origin, name, seen_epoch=seen, ttl_ms=5000)
        except (ClaimLost, LeaseHeld) as exc:
            results[name] = exc

    threads = [threading.Thread(target=claim, args=item) for item in stores.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_two_concurrent_claimers_exactly_one_wins_in_100_repetitions(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    config = StoreConfig.standalone(redis_server.url)
    with CheckpointStore.connect(config, keyring) as a, \
            CheckpointStore.connect(config, keyring) as b:
        for rep in range(100):
            origin = f"origin-{rep}"
            epoch = a.lease_acquire(origin, origin, ttl_ms=5000)
            a.lease_release(origin, origin, epoch)
            seen = b.state(origin).epoch
            results = _race({"standby-1": a, "standby-2": b}, origin, seen)
            winners = [n for n, r in results.items() if isinstance(r, int)]
            assert len(winners) == 1, f"repetition {rep}: {results}"
            assert results[winners[0]] == seen + 1
            state = a.state(origin)
            assert (state.owner, state.epoch, state.lease_holder) == (winners[0], seen + 1,
                                                                      winners[0])


def test_lease_not_renewed_expires_within_its_ttl_and_can_then_be_claimed(
        store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=300)
    granted = time.monotonic()  # the lease's TTL runs from a moment before this
    state = store.state(ORIGIN)
    assert state.lease_holder == "origin-a" and 0 < (state.lease_ms_left or 0) <= 300
    with pytest.raises(LeaseHeld, match="'origin-a' holds it"):
        store.claim(ORIGIN, "standby-1", seen_epoch=epoch, ttl_ms=300)

    def first_look_past_the_ttl() -> OriginState | None:
        # the condition is the clock itself; Redis expires a key on access (or in its 100 ms
        # active cycle), so the first read past the TTL must already find the lease gone
        return store.state(ORIGIN) if time.monotonic() - granted > 0.3 else None

    after_ttl = wait_until(first_look_past_the_ttl, 5, what="a read past the lease's TTL")
    assert after_ttl is not None and after_ttl.lease_holder is None
    with pytest.raises(LeaseLost, match="expired or taken"):
        store.lease_renew(ORIGIN, "origin-a", epoch, ttl_ms=300)
    assert store.claim(ORIGIN, "standby-1", seen_epoch=epoch, ttl_ms=300) == epoch + 1


def test_renewal_by_a_fenced_holder_fails(store: CheckpointStore) -> None:
    epoch = store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.lease_renew(ORIGIN, "origin-a", epoch, ttl_ms=5000)
    store.client_for(ORIGIN).delete(f"tcpcp:{{{ORIGIN}}}:lease")  # the lease ran out
    store.claim(ORIGIN, "standby-1", seen_epoch=epoch, ttl_ms=5000)
    with pytest.raises(StaleEpoch):
        store.lease_renew(ORIGIN, "origin-a", epoch, ttl_ms=5000)
    with pytest.raises(LeaseHeld):
        store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)
    store.client_for(ORIGIN).delete(f"tcpcp:{{{ORIGIN}}}:lease")
    with pytest.raises(NotOwner, match="'standby-1' owns it"):
        store.lease_acquire(ORIGIN, "origin-a", ttl_ms=5000)


def test_epochs_beyond_2_53_are_returned_exactly_and_the_last_one_is_not_bumped(
        store: CheckpointStore) -> None:
    # Redis Lua numbers are doubles: an epoch passed through one would come back rounded
    admin = store.client_for(ORIGIN)
    meta = f"tcpcp:{{{ORIGIN}}}:meta"
    admin.hset(meta, "epoch", 2**53 + 2)
    claimed = store.claim(ORIGIN, "standby-1", seen_epoch=2**53 + 2, ttl_ms=5000)
    assert claimed == 2**53 + 3 == store.state(ORIGIN).epoch
    store.put(cp(epoch=claimed, version=1))
    assert store.lease_acquire(ORIGIN, "standby-1", ttl_ms=5000) == 2**53 + 3
    store.lease_renew(ORIGIN, "standby-1", claimed, ttl_ms=5000)
    store.lease_release(ORIGIN, "standby-1", claimed)
    admin.hset(meta, "epoch", 2**63 - 1)
    with pytest.raises(EpochExhausted, match=r"below 2\*\*63-1 to be bumped, got 92233720368"):
        store.claim(ORIGIN, "standby-2", seen_epoch=2**63 - 1, ttl_ms=5000)
    state = store.state(ORIGIN)
    assert (state.epoch, state.owner) == (2**63 - 1, "standby-1")
    fresh = "origin-b"
    store.client_for(fresh).hset(f"tcpcp:{{{fresh}}}:meta", "epoch", 2**63 - 1)
    with pytest.raises(EpochExhausted):
        store.lease_acquire(fresh, fresh, ttl_ms=5000)
    assert store.state(fresh).owner is None


def test_function_library_is_loaded_on_connect_and_a_newer_one_is_refused(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    admin = redis_server.admin()
    with pytest.raises(Exception, match="not found"):
        admin.execute_command("FCALL_RO", "tcpcp_version", 0)
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring):
        assert admin.execute_command("FCALL_RO", "tcpcp_version", 0) == LIBRARY_VERSION
    newer = LIBRARY_SOURCE.replace(f"LIBRARY_VERSION = {LIBRARY_VERSION}",
                                   f"LIBRARY_VERSION = {LIBRARY_VERSION + 1}")
    admin.execute_command("FUNCTION", "LOAD", "REPLACE", newer)
    with pytest.raises(LibraryVersionError, match=f"got version {LIBRARY_VERSION + 1}"):
        CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring)


def test_waitaof_durability_is_checked_against_the_server_at_connect(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    version = redis_server.admin().info("server")["redis_version"]
    config = StoreConfig.standalone(redis_server.url,
                                    durability=Durability.parse("waitaof:0:1:200"))
    if tuple(int(x) for x in version.split(".")[:2]) < (7, 2):
        with pytest.raises(DurabilityUnsupported, match=f"Redis >= 7.2.*is Redis {version}"):
            CheckpointStore.connect(config, keyring)
    else:
        with CheckpointStore.connect(config, keyring) as store:
            assert store.config.durability == config.durability


def test_unreachable_store_is_reported_as_unavailable(keyring: KeyRing) -> None:  # noqa: F811
    config = StoreConfig.standalone(f"redis://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        CheckpointStore.connect(config, keyring)
