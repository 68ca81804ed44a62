"""The store on a Redis Cluster of three primaries: each origin's keys stay in one slot."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from store.acl import acl_rules
from store.client import CheckpointStore
from store.config import StoreConfig, Topology
from store.errors import ClaimLost, LeaseHeld, StaleEpoch
from store.keys import OriginKeys
from store.outlog import OutputRange
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import LocalRedis, keyring, start_cluster  # noqa: F401


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[LocalRedis]]:
    nodes = start_cluster(3)
    try:
        yield nodes
    finally:
        for n in nodes:
            n.close()


@pytest.fixture
def cluster(cluster_nodes: list[LocalRedis]) -> list[LocalRedis]:
    """The module's cluster emptied (keys and the test's ACL user; the function library
    stays): counts a test asserts are its own, whatever ran or failed before it."""
    for n in cluster_nodes:
        n.admin().flushall()
        n.admin().execute_command("ACL", "DELUSER", "tcpcp")
    return cluster_nodes


def owner_port(nodes: list[LocalRedis], origin: str) -> int:
    slot = int(nodes[0].admin().execute_command("CLUSTER", "KEYSLOT", OriginKeys(origin).meta))
    for n in nodes:
        for start, end, *_ in n.admin().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(_[0][1])
    raise AssertionError(f"slot {slot} not covered")


def origins_on_every_node(nodes: list[LocalRedis]) -> list[str]:
    """One origin name per primary, found by trying names."""
    chosen: dict[int, str] = {}
    for i in range(1000):
        name = f"origin-{i}"
        chosen.setdefault(owner_port(nodes, name), name)
        if len(chosen) == len(nodes):
            return sorted(chosen.values())
    raise AssertionError("could not spread origins over the nodes")


def cp(origin: str, conn: str, epoch: int, version: int) -> Checkpoint:
    return Checkpoint(origin=origin, conn=conn, epoch=epoch, version=version,
                      time_ns=time.time_ns(), inbound_consumed=version, outbound_produced=0,
                      ici=b"ici", app_state=origin.encode(), send_queue=b"q")


def test_put_get_list_claim_work_for_origins_on_different_cluster_nodes(
        cluster: list[LocalRedis], keyring: KeyRing) -> None:  # noqa: F811
    origins = origins_on_every_node(cluster)
    assert len({owner_port(cluster, o) for o in origins}) == 3
    with CheckpointStore.connect(StoreConfig.cluster(cluster[0].url), keyring) as store:
        for node in cluster:  # the library was loaded on every primary
            assert node.admin().execute_command("FCALL_RO", "tcpcp_version", 0) >= 1
        for origin in origins:
            epoch = store.lease_acquire(origin, origin, ttl_ms=5000)
            store.put(cp(origin, "c1", epoch, 1))
            store.put_many([cp(origin, f"c{i}", epoch, 2) for i in range(10)])
            for conn in ("c1", "c5"):
                got = store.get(origin, conn)
                assert got is not None and (got.origin, got.conn, got.version, got.epoch,
                                            got.app_state) == (origin, conn, 2, epoch,
                                                               origin.encode())
            assert len(store.connections(origin)) == 10
            store.lease_release(origin, origin, epoch)
            seen = store.state(origin).epoch
            new_epoch = store.claim(origin, "standby-1", seen, ttl_ms=5000)
            with pytest.raises((ClaimLost, LeaseHeld)):
                store.claim(origin, "standby-2", seen, ttl_ms=5000)
            with pytest.raises(StaleEpoch):
                store.put(cp(origin, "c1", epoch, 3))
            assert store.delete(origin, new_epoch, ["c9"]) == 1
        assert set(origins) <= set(store.origins())
        for origin in origins:  # each origin's data lives on its own node only
            port = owner_port(cluster, origin)
            node = next(n for n in cluster if n.port == port)
            assert node.admin().hlen(OriginKeys(origin).records) == 9


def test_least_privilege_acl_user_runs_the_store_on_a_cluster(
        cluster: list[LocalRedis], keyring: KeyRing) -> None:  # noqa: F811
    for node in cluster:
        node.admin().execute_command("ACL", "SETUSER", "tcpcp", "reset", "on", ">pw",
                                     *acl_rules(Topology.CLUSTER))
    config = StoreConfig.cluster(cluster[0].url, username="tcpcp", password="pw")
    with CheckpointStore.connect(config, keyring) as store:
        for origin in origins_on_every_node(cluster):
            origin = origin + "-acl"
            epoch = store.lease_acquire(origin, origin, ttl_ms=5000)
            store.put(cp(origin, "c1", epoch, 1))
            assert [r.conn for r in store.records(origin) if r.checkpoint] == ["c1"]
        assert len(store.origins()) >= 3


def test_output_logs_share_their_origin_slot_and_go_with_their_records_on_a_cluster(
        cluster: list[LocalRedis], keyring: KeyRing) -> None:  # noqa: F811
    conn = "[fd77:1::2]:40000>[fd77:9::1]:80"
    with CheckpointStore.connect(StoreConfig.cluster(cluster[0].url), keyring) as store:
        for origin in origins_on_every_node(cluster):
            keys = OriginKeys(origin)
            admin = cluster[0].admin()
            slots = {int(admin.execute_command("CLUSTER", "KEYSLOT", k))
                     for k in (keys.meta, keys.output_positions, keys.output(conn))}
            assert len(slots) == 1
            epoch = store.lease_acquire(origin, origin, ttl_ms=5000)
            store.put_with_output(cp(origin, conn, epoch, 1), 0, b"hello ")
            (outcome,) = store.append_many([OutputRange(origin, conn, epoch, 6, b"world")])
            assert outcome.error is None
            assert store.trim_output(origin, conn, epoch, 3) == 3
            assert store.read_output(origin, conn, 3) == b"lo world"
            node = next(n for n in cluster if n.port == owner_port(cluster, origin))
            assert node.admin().xlen(keys.output(conn)) == 2
            assert store.delete(origin, epoch, [conn]) == 1
            assert not node.admin().exists(keys.output(conn), keys.output_positions)
