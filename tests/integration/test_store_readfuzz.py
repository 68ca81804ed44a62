"""Fuzz of the whole read path: random bytes stored in Redis, read back through the store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.client import CheckpointStore
from store.config import StoreConfig
from store.errors import RecordError
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
