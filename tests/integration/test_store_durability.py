"""Durability (WAIT) and refused records against real redis-server processes."""

from __future__ import annotations

import time

import pytest

from store.client import CheckpointStore
from store.config import Durability, StoreConfig
from store.errors import (
    DurabilityError,
    RecordBadSignature,
    RecordCorrupt,
    RecordError,
    RecordForeign,
    RecordTooLarge,
    RecordTruncated,
    RecordUnknownKey,
    RecordUnsigned,
    StoreUnavailable,
)
from store.keys import OriginKeys
from store.limits import Limits
from store.record import Checkpoint, encode
from store.signing import MAC_BYTES, KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    keyring,
    new_keyring,
    redis_server,
    replicas_acknowledging,
    running,
    wait_for,
)

ORIGIN = "origin-a"


def cp(conn: str, epoch: int, version: int, payload: bytes = b"state") -> Checkpoint:
    return Checkpoint(origin=ORIGIN, conn=conn, epoch=epoch, version=version,
                      time_ns=time.time_ns(), inbound_consumed=1, outbound_produced=2,
                      ici=b"ici", app_state=payload, send_queue=b"q")


def test_wait_1_put_fails_within_the_timeout_when_the_replica_is_stopped(
        keyring: KeyRing) -> None:  # noqa: F811
    primary = LocalRedis()
    with running(primary):
        replica = LocalRedis({"replicaof": f"127.0.0.1 {primary.port}"})
        with running(replica):
            replicas_acknowledging(primary, 1)
            config = StoreConfig.standalone(primary.url, durability=Durability.parse("wait:1:300"))
            with CheckpointStore.connect(config, keyring) as store:
                epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)
                store.put(cp("c1", epoch, 1))
                wait_for(lambda: replica.admin().hget(OriginKeys(ORIGIN).versions, "c1") == b"1",
                         5, "record on the replica")
                replica.stop()
                started = time.monotonic()
                with pytest.raises(DurabilityError,
                                   match=r"needed 1 replica\(s\) within 300 ms \(WAIT\), got 0"):
                    store.put(cp("c1", epoch, 2))
                elapsed = time.monotonic() - started
                # it waited for the replica the whole timeout, then gave up promptly
                assert 0.29 <= elapsed < 0.3 + 1.0, f"put took {elapsed:.3f} s, timeout 0.3 s"
                with pytest.raises(DurabilityError):
                    store.put_many([cp(f"b{i}", epoch, 1) for i in range(10)])
                with pytest.raises(DurabilityError):  # the standby would see the older expiry
                    store.lease_renew(ORIGIN, ORIGIN, epoch, ttl_ms=60_000)
                store.lease_release(ORIGIN, ORIGIN, epoch)
                with pytest.raises(DurabilityError, match="WAIT"):  # a claim is fencing state
                    store.claim(ORIGIN, "standby-1", epoch, ttl_ms=5000)
                assert store.state(ORIGIN).owner == "standby-1"  # applied on the primary only


def test_primary_short_of_min_replicas_refuses_the_put_as_unavailable_and_keeps_the_old_record(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring) as store:
        epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)
        store.put(cp("c1", epoch, 1, b"first"))
        redis_server.admin().config_set("min-replicas-to-write", 1)
        with pytest.raises(StoreUnavailable, match=r"min-replicas-to-write.*NOREPLICAS"):
            store.put(cp("c1", epoch, 2, b"second"))
        redis_server.admin().config_set("min-replicas-to-write", 0)
        got = store.get(ORIGIN, "c1")
        assert got is not None and (got.version, got.app_state) == (1, b"first")


def test_primary_above_maxmemory_refuses_the_put_as_unavailable(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring) as store:
        epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)
        redis_server.admin().config_set("maxmemory-policy", "noeviction")
        redis_server.admin().config_set("maxmemory", 1)
        try:
            with pytest.raises(StoreUnavailable, match=r"above its maxmemory.*used memory"):
                store.put(cp("c1", epoch, 1))
        finally:
            redis_server.admin().config_set("maxmemory", 0)
        assert store.get(ORIGIN, "c1") is None


def _store_raw(server: LocalRedis, conn: str, raw: bytes) -> None:
    keys = OriginKeys(ORIGIN)
    server.admin().hset(keys.records, conn, raw)
    server.admin().hset(keys.versions, conn, 1)


def test_damaged_and_foreign_records_are_refused_with_their_reason_and_others_still_read(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    limits = Limits(max_record=4096)
    config = StoreConfig.standalone(redis_server.url, limits=limits)
    with CheckpointStore.connect(config, keyring) as store:
        epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)
        store.put(cp("good", epoch, 1))
        good = encode(cp("good", epoch, 1), keyring)
        flipped = bytearray(encode(cp("corrupt", epoch, 1), keyring))
        flipped[-40] ^= 0x01
        unsigned = bytearray(encode(cp("unsigned", epoch, 1), keyring))
        unsigned = unsigned[:5] + b"\x00" + unsigned[6 + unsigned[5]:-MAC_BYTES]
        planted = {
            "corrupt": (bytes(flipped), RecordBadSignature),
            "truncated": (encode(cp("truncated", epoch, 1), keyring)[:-50], RecordTruncated),
            "unsigned": (bytes(unsigned), RecordUnsigned),
            "forged": (encode(cp("forged", epoch, 1), new_keyring()), RecordBadSignature),
            "stranger": (encode(cp("stranger", epoch, 1), KeyRing("k7", {"k7": b"x" * 32})),
                         RecordUnknownKey),
            "oversized": (encode(cp("oversized", epoch, 1, b"s" * 5000), keyring),
                          RecordTooLarge),
            "copied": (good, RecordForeign),
            "garbage": (b"\x00" * 64, RecordCorrupt),
        }
        for conn, (raw, _) in planted.items():
            _store_raw(redis_server, conn, raw)
        for conn, (_, error) in planted.items():
            with pytest.raises(error):
                store.get(ORIGIN, conn)
        results = {r.conn: r for r in store.records(ORIGIN)}
        assert results["good"].checkpoint == store.get(ORIGIN, "good")
        for conn, (_, error) in planted.items():
            assert isinstance(results[conn].error, error), (conn, results[conn])
            assert isinstance(results[conn].error, RecordError) and str(results[conn].error)
