"""Translation of the Function library's refusals and durability replies into the store's
exceptions (pure: no server is contacted)."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from store.client import CheckpointStore, _item_refusal, _refusal, _Single
from store.config import Durability, StoreConfig
from store.errors import (
    ClaimLost,
    DurabilityError,
    EpochExhausted,
    LeaseHeld,
    LeaseLost,
    NotOwner,
    RecordTooLarge,
    StaleEpoch,
    StoreError,
    StoreUnavailable,
    TooManyRecords,
    VersionNotNewer,
    WriteRefused,
)
from store.signing import KeyRing


@given(st.integers(0, 2**63), st.integers(0, 2**63))
def test_stale_epoch_reply_carries_both_epochs(given_epoch: int, current: int) -> None:
    exc = _refusal(f"TCPCP_STALE_EPOCH given={given_epoch} current={current}", "o")
    assert isinstance(exc, StaleEpoch)
    assert (exc.given, exc.current) == (given_epoch, current)
    assert f"current epoch {current}, got {given_epoch}" in str(exc)


@pytest.mark.parametrize("reply,kind,text", [
    ("TCPCP_LEASE_HELD holder=origin-a", LeaseHeld, "'origin-a' holds it"),
    ("TCPCP_LEASE_LOST holder=false", LeaseLost, "expired or taken"),
    ("TCPCP_NOT_OWNER owner=standby epoch=4", NotOwner, "'standby' owns it at epoch 4"),
    ("TCPCP_CLAIM_LOST seen=3 current=4", ClaimLost, "expected epoch 3, got 4"),
    ("TCPCP_UNOWNED epoch=0", NotOwner, "got none at epoch 0"),
    ("TCPCP_EPOCH_EXHAUSTED current=9223372036854775807", EpochExhausted,
     "got 9223372036854775807: the origin cannot be claimed again"),
])
def test_library_refusals_map_to_their_exceptions(reply: str, kind: type, text: str) -> None:
    exc = _refusal(reply, "origin-a")
    assert isinstance(exc, kind) and text in str(exc)


def test_other_errors_are_not_taken_for_refusals() -> None:
    assert _refusal("ERR Function not found", "o") is None
    assert _refusal("NOPERM this user has no permissions", "o") is None


@pytest.mark.parametrize("status,kind", [
    ("VERSION_NOT_NEWER 17", VersionNotNewer), ("TOO_MANY 5", TooManyRecords),
    ("TOO_LARGE 999", RecordTooLarge), ("SOMETHING_NEW", WriteRefused),
])
def test_per_record_statuses_map_to_their_exceptions(status: str, kind: type) -> None:
    exc = _item_refusal(status, "o", "c", 3, 5)
    assert isinstance(exc, kind) and str(exc)
    if isinstance(exc, VersionNotNewer):
        assert (exc.given, exc.stored) == (3, 17)


def _store(durability: str) -> CheckpointStore:
    config = StoreConfig.standalone("redis://127.0.0.1:1", durability=Durability.parse(durability))
    keys = KeyRing(sign_with="k", keys={"k": b"s" * 32})
    return CheckpointStore(config, keys, _Single(redis.Redis(port=1)))  # never connects


@given(st.integers(0, 1), st.integers(0, 5))
def test_waitaof_reply_is_durable_only_when_both_counts_are_met(local: int, replicas: int) -> None:
    store = _store("waitaof:1:2:500")
    if local >= 1 and replicas >= 2:
        store._check_durable([local, replicas], "o")
    else:
        with pytest.raises(DurabilityError,
                           match=f"got local={local} replicas={replicas}: not durable"):
            store._check_durable([local, replicas], "o")


@given(st.integers(0, 5))
def test_wait_reply_is_durable_only_with_enough_replicas(acked: int) -> None:
    store = _store("wait:2:300")
    if acked >= 2:
        store._check_durable(acked, "o")
    else:
        with pytest.raises(DurabilityError, match=rf"needed 2 replica\(s\) within 300 ms \(WAIT\), "
                                                  rf"got {acked}"):
            store._check_durable(acked, "o")


def test_error_in_place_of_the_durability_reply_is_never_success() -> None:
    store = _store("wait:1")
    with pytest.raises(StoreUnavailable, match="durability wait:1:1000"):
        store._check_durable(redis.ConnectionError("reset by peer"), "o")
    with pytest.raises(StoreError):
        store._check_durable(redis.ResponseError("ERR something new"), "o")
