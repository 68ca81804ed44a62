"""The store behind Sentinel: a primary crash during puts loses no acknowledged checkpoint."""

from __future__ import annotations

import time

from store.client import CheckpointStore
from store.config import Durability, StoreConfig
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    keyring,
    put_through_failover,
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
                with CheckpointStore.connect(config, keyring) as store:
                    epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=600_000)
                    run = put_through_failover(
                        store, lambda i: cp(i, epoch), crash=primary.kill,
                        failed_over=lambda: all(  # every Sentinel names the new primary
                            sentinel_master_port(s, SERVICE) == replica.port
                            for s in sentinels),
                        after_failover=fresh.start, deadline_s=60)
                print(f"puts attempted={run.attempts} acknowledged={len(run.acknowledged)} "
                      f"refused={len(run.refused)} failover seen at put {run.failed_over_at}")
                assert sentinel_master_port(sentinels[0], SERVICE) == replica.port
                assert run.failed_over_at is not None and run.refused, "the crash was not noticed"
                assert len([c for c in run.acknowledged if c.version < 300]) == 299
                with CheckpointStore.connect(config, keyring) as reader:
                    stored = {r.conn: r for r in reader.records(ORIGIN)}
                    for written in run.acknowledged:
                        got = stored[written.conn]
                        assert got.error is None and got.checkpoint == written
            finally:
                fresh.close()
                for s in sentinels:
                    s.close()
