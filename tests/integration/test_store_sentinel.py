"""The store behind Sentinel: a primary crash during puts loses no acknowledged checkpoint."""

from __future__ import annotations

import time

from store.client import CheckpointStore
from store.config import Durability, StoreConfig
from store.errors import DurabilityError, StoreUnavailable
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    keyring,
    replicas_acknowledging,
    running,
    sentinel_master_port,
    start_sentinels,
)

SERVICE = "tcpcp-store"
ORIGIN = "origin-a"


def cp(i: int, epoch: int) -> Checkpoint:
    return Checkpoint(origin=ORIGIN, conn=f"c{i}", epoch=epoch, version=i, time_ns=time.time_ns(),
                      inbound_consumed=i * 100, outbound_produced=i * 7, ici=b"ici%d" % i,
                      app_state=b"state-%d" % i * 10, send_queue=b"q" * (i % 50))


def test_every_acknowledged_put_survives_a_primary_crash_and_sentinel_failover(
        keyring: KeyRing) -> None:  # noqa: F811
    primary = LocalRedis()
    with running(primary):
        replica = LocalRedis({"replicaof": f"127.0.0.1 {primary.port}"})
        with running(replica):
            replicas_acknowledging(primary, 1)
            sentinels = start_sentinels(primary, SERVICE, down_after_ms=1000)
            # The crashed primary stays down; after the failover a fresh, empty replica joins
            # (for WAIT 1). It must never be elected (replica-priority 0): a failover to an empty
            # server wipes every replica. Restarting the old primary empty did exactly that when
            # the loaded machine made the Sentinels think the new primary down.
            fresh = LocalRedis({"replicaof": f"127.0.0.1 {replica.port}",
                                "replica-priority": "0"})
            try:
                config = StoreConfig.sentinel(
                    SERVICE, [("127.0.0.1", s.port) for s in sentinels],
                    durability=Durability.parse("wait:1:500"), connect_timeout_s=0.5)
                acknowledged: list[Checkpoint] = []
                refused: list[str] = []
                failed_over_at: int | None = None
                with CheckpointStore.connect(config, keyring) as store:
                    epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=600_000)
                    deadline = time.monotonic() + 60
                    i = 0
                    while i < 1000 or (failed_over_at is not None
                                       and not any(c.version > failed_over_at
                                                   for c in acknowledged)):
                        assert time.monotonic() < deadline, \
                            f"no put succeeded after failover; last refusals {refused[-3:]}"
                        i += 1
                        if i == 300:
                            primary.kill()
                        record = cp(i, epoch)
                        try:
                            store.put(record)
                            acknowledged.append(record)
                        except (StoreUnavailable, DurabilityError) as exc:
                            refused.append(f"put {i}: {exc}")
                            time.sleep(0.02)
                        if i > 300 and failed_over_at is None and all(
                                sentinel_master_port(s, SERVICE) == replica.port
                                for s in sentinels):
                            failed_over_at = i  # every Sentinel names the new primary
                        if failed_over_at is not None and fresh.proc is None:
                            fresh.start()
                print(f"puts attempted={i} acknowledged={len(acknowledged)} "
                      f"refused={len(refused)} failover seen at put {failed_over_at}")
                assert sentinel_master_port(sentinels[0], SERVICE) == replica.port
                assert failed_over_at is not None and refused, "the crash was not noticed"
                assert len([c for c in acknowledged if c.version < 300]) == 299
                with CheckpointStore.connect(config, keyring) as reader:
                    stored = {r.conn: r for r in reader.records(ORIGIN)}
                    for written in acknowledged:
                        got = stored[written.conn]
                        assert got.error is None and got.checkpoint == written
            finally:
                fresh.close()
                for s in sentinels:
                    s.close()
