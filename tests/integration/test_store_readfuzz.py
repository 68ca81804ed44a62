"""Fuzz of the whole read path: random bytes stored in Redis (records, versions, epochs), read
back through the store."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.client import CheckpointStore
from store.config import StoreConfig
from store.errors import RecordError, StoreError
from store.keys import OriginKeys
from store.record import Checkpoint, encode
from store.signing import MAC_BYTES
from tests.integration.store_support import LocalRedis, new_keyring, running

KEYS = new_keyring()
ORIGIN = "origin-fuzz"
VALID = encode(Checkpoint(origin=ORIGIN, conn="c", epoch=1, version=1, time_ns=1,
                          inbound_consumed=1, outbound_produced=1, ici=b"i" * 30,
                          app_state=b"a" * 30, send_queue=b"q" * 30), KEYS)


@pytest.fixture(scope="module")
def fuzz_store() -> Iterator[tuple[LocalRedis, CheckpointStore]]:
    server = LocalRedis()
    with running(server), CheckpointStore.connect(StoreConfig.standalone(server.url),
                                                  KEYS) as store:
        yield server, store


@st.composite
def _flipped(draw: st.DrawFn) -> bytes:
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def _mutations() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=400),
        st.integers(0, len(VALID) - 1).map(lambda n: VALID[:n]),
        _flipped(),
        st.binary(min_size=1, max_size=40).map(lambda b: VALID[:-MAC_BYTES] + b),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_mutations())
def test_random_stored_bytes_come_out_only_as_record_errors(
        fuzz_store: tuple[LocalRedis, CheckpointStore], raw: bytes) -> None:
    server, store = fuzz_store
    if raw == VALID:
        return
    server.admin().hset(OriginKeys(ORIGIN).records, "c", raw)
    with pytest.raises(RecordError):
        store.get(ORIGIN, "c")
    (result,) = list(store.records(ORIGIN))
    assert result.checkpoint is None and isinstance(result.error, RecordError)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(epoch=st.one_of(st.binary(max_size=24), st.integers(0, 2**70).map(str)),
       version=st.one_of(st.binary(max_size=24), st.integers(0, 2**70).map(str)))
def test_random_fencing_state_and_versions_come_out_only_as_store_errors(
        fuzz_store: tuple[LocalRedis, CheckpointStore], epoch: bytes | str,
        version: bytes | str) -> None:
    """Whatever else wrote the epoch or a version, every operation either works or raises a
    StoreError (never ValueError, KeyError, UnicodeDecodeError from parsing what came back)."""
    server, store = fuzz_store
    origin = "origin-state-fuzz"
    keys = OriginKeys(origin)
    admin = server.admin()
    admin.delete(*keys.all())
    admin.hset(keys.meta, mapping={"epoch": epoch, "owner": "o"})
    admin.hset(keys.versions, "c", version)
    admin.hset(keys.records, "c", VALID)
    checkpoint = Checkpoint(origin=origin, conn="c", epoch=1, version=7, time_ns=1,
                            inbound_consumed=1, outbound_produced=1, ici=b"", app_state=b"",
                            send_queue=b"")
    operations: list[Callable[[], object]] = [
        lambda: store.state(origin),
        lambda: store.connections(origin),
        lambda: list(store.records(origin)),
        lambda: store.put(checkpoint),
        lambda: store.put_many([checkpoint]),
        lambda: store.delete(origin, 1, ["c"]),
        lambda: store.lease_acquire(origin, "o", 1000),
        lambda: store.lease_renew(origin, "o", 1, 1000),
        lambda: store.lease_release(origin, "o", 1),
        lambda: store.claim(origin, "s", 1, 1000),
    ]
    for operation in operations:
        with contextlib.suppress(StoreError):
            operation()
