"""Real redis-server processes in the lab: reachability, replication, Sentinel failover, Cluster."""

from __future__ import annotations

from collections.abc import Callable

import redis

from ops.lab import Lab
from ops.redislab import RedisClusterSet, RedisServer, SentinelSet
from ops.wait import wait_until


def _roundtrip(srv: RedisServer, key: str, value: bytes) -> bytes | None:
    c = srv.client()
    try:
        c.set(key, value)
        return c.get(key)  # type: ignore[return-value]
    finally:
        c.close()


def test_redis_in_store_is_reachable_from_origin_and_standby(
        lab: Lab, redis_factory: Callable[..., RedisServer]) -> None:
    srv = redis_factory("store")
    assert srv.addr == lab.addr("store")
    for host in ("origin", "standby"):
        assert lab.call(host, _roundtrip, srv, f"k-{host}", host.encode()) == host.encode()


def test_redis_in_store_is_not_reachable_from_origin_when_partitioned(
        fresh_lab: Lab) -> None:
    srv = RedisServer(fresh_lab, "store", 6390).start()
    try:
        fresh_lab.partition("origin", ["store"])

        def ping() -> bool:
            c = redis.Redis(host=srv.addr, port=srv.port, socket_timeout=0.5,
                            socket_connect_timeout=0.5)
            try:
                return bool(c.ping())
            except (redis.ConnectionError, redis.TimeoutError):
                return False
            finally:
                c.close()

        assert fresh_lab.call("origin", ping) is False
        assert fresh_lab.call("standby", ping) is True
        fresh_lab.heal()
        assert fresh_lab.call("origin", ping) is True
    finally:
        srv.stop()


def test_replica_follows_its_primary(lab: Lab, redis_factory: Callable[..., RedisServer]) -> None:
    primary = redis_factory("store")
    replica = redis_factory("store2", replicaof=primary)
    lab.call("origin", _roundtrip, primary, "replicated", b"yes")

    def read() -> bytes | None:
        c = replica.client()
        try:  # replication is asynchronous: the key arrives a moment later
            return wait_until(lambda: c.get("replicated"), 10,  # type: ignore[return-value]
                              what="the key on the replica")
        finally:
            c.close()

    assert lab.call("standby", read) == b"yes"


def test_sentinels_fail_over_when_the_primary_is_killed(fresh_lab: Lab) -> None:
    lab = fresh_lab
    primary = RedisServer(lab, "store", 6379).start()
    replica = RedisServer(lab, "store2", 6379, replicaof=primary).start()
    sentinels = SentinelSet(lab, primary, ["store", "store2", "store3"]).start()
    try:
        before = sentinels.primary_address()
        assert before == (primary.addr, primary.port)
        lab.call("origin", _roundtrip, primary, "before-failover", b"1")

        def replicated() -> int:
            c = primary.client()
            try:
                return int(c.execute_command("WAIT", 1, 2000))
            finally:
                c.close()

        assert lab.call("origin", replicated) == 1  # asynchronous replication: wait for it
        primary.kill()
        after = sentinels.wait_failover(before, timeout=40)
        assert after == (replica.addr, replica.port)

        def write_via_sentinel() -> bytes | None:
            from redis.sentinel import Sentinel

            s = Sentinel(sentinels.addresses, socket_timeout=1)

            def write() -> tuple[bytes | None]:  # truthy even when the key was lost
                master = s.master_for(sentinels.service, socket_timeout=1)
                master.set("after-failover", b"2")
                return (master.get("before-failover"),)  # type: ignore[return-value]

            # sentinels agree on the new primary a moment after announcing it (until then:
            # MasterNotFoundError, ConnectionError or ReadOnlyError, kept as the cause)
            return wait_until(write, 20, what="a write through the new primary")[0]

        assert lab.call("origin", write_via_sentinel) == b"1"
    finally:
        sentinels.stop()
        replica.stop()
        primary.stop()


def test_cluster_of_three_primaries_serves_keys_from_every_node(lab: Lab) -> None:
    cluster = RedisClusterSet(lab, ["store", "store2", "store3"], base_port=7100).start()
    try:
        def spread() -> set[str]:
            from redis.cluster import ClusterNode, RedisCluster

            rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
            try:
                owners = set()
                for i in range(30):
                    key = f"{{origin-{i}}}:k"
                    rc.set(key, str(i))
                    assert rc.get(key) == str(i).encode()
                    owners.add(rc.get_node_from_key(key).host)
                return owners
            finally:
                rc.close()

        assert lab.call("origin", spread) == {n.addr for n in cluster.nodes}
    finally:
        cluster.stop()
