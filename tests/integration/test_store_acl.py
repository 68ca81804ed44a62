"""A least-privilege ACL user (store/acl.py) is enough to run every store operation."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis

from store.acl import acl_rules
from store.client import CheckpointStore
from store.config import Durability, StoreConfig
from store.errors import DurabilityError, StaleEpoch, StoreConfigError
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import LocalRedis, keyring, redis_server  # noqa: F401

ORIGIN = "origin-a"


def cp(epoch: int, version: int) -> Checkpoint:
    return Checkpoint(origin=ORIGIN, conn="c1", epoch=epoch, version=version,
                      time_ns=time.time_ns(), inbound_consumed=0, outbound_produced=0,
                      ici=b"ici", app_state=b"s", send_queue=b"")


def test_least_privilege_acl_user_runs_every_store_operation(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    wait = Durability.parse("wait:1:100")
    redis_server.admin().acl_setuser("tcpcp", enabled=True, passwords=["+s3cret"],
                                     reset=True)
    redis_server.admin().execute_command("ACL", "SETUSER", "tcpcp", *acl_rules(durability=wait))
    config = StoreConfig.standalone(redis_server.url, username="tcpcp", password="s3cret")
    with CheckpointStore.connect(config, keyring) as store:  # loads the library itself
        epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=5000)
        store.lease_renew(ORIGIN, ORIGIN, epoch, ttl_ms=5000)
        store.put(cp(epoch, 1))
        store.put_many([cp(epoch, 2)])
        got = store.get(ORIGIN, "c1")
        assert got is not None and (got.version, got.epoch) == (2, epoch)
        assert [r.checkpoint.version for r in store.records(ORIGIN) if r.checkpoint] == [2]
        assert store.connections(ORIGIN) == {"c1": 2}
        assert store.origins() == [ORIGIN]
        store.lease_release(ORIGIN, ORIGIN, epoch)
        new_epoch = store.claim(ORIGIN, "standby-1", epoch, ttl_ms=5000)
        with pytest.raises(StaleEpoch):
            store.put(cp(epoch, 3))
        store.put_with_output(cp(new_epoch, 3), 0, b"logged ")
        store.append_output(ORIGIN, "c1", new_epoch, 7, b"output")
        assert store.trim_output(ORIGIN, "c1", new_epoch, 3) == 3
        assert store.read_output(ORIGIN, "c1", 3) == b"ged output"
        bounds = store.output_bounds(ORIGIN, "c1")
        assert bounds is not None and (bounds.start, bounds.end) == (3, 13)
        assert store.delete(ORIGIN, new_epoch, ["c1"]) == 1
        assert store.output_bounds(ORIGIN, "c1") is None
        assert store.state(ORIGIN).owner == "standby-1"
    with CheckpointStore.connect(StoreConfig.standalone(
            redis_server.url, username="tcpcp", password="s3cret", durability=wait),
            keyring) as store:
        with pytest.raises(DurabilityError):  # no replica here: WAIT is allowed but unmet
            store.lease_acquire("origin-b", "origin-b", ttl_ms=5000)
        epoch = store.state("origin-b").epoch
        with pytest.raises(DurabilityError):
            store.put(dataclasses.replace(cp(epoch, 1), origin="origin-b"))
    user = redis.Redis(host="127.0.0.1", port=redis_server.port, username="tcpcp",
                       password="s3cret")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.lpush(f"tcpcp:{{{ORIGIN}}}:rec", "x")  # a command tcpcp never uses
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.config_set("appendonly", "no")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get("other-application-key")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.flushall()


def test_user_without_the_needed_commands_gets_a_clear_permission_error(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    redis_server.admin().execute_command("ACL", "SETUSER", "weak", "on", ">pw", "~*", "-@all",
                                         "+ping", "+hget")
    config = StoreConfig.standalone(redis_server.url, username="weak", password="pw")
    with pytest.raises(StoreConfigError, match="ACL user lacks a permission"):
        CheckpointStore.connect(config, keyring)
