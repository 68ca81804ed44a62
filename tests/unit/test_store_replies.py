"""Translation of the Function library's refusals into the store's exceptions (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.client import _item_refusal, _refusal
from store.errors import (
    ClaimLost,
    EpochExhausted,
    LeaseHeld,
    LeaseLost,
    NotOwner,
    RecordTooLarge,
    StaleEpoch,
    TooManyRecords,
    VersionNotNewer,
    WriteRefused,
)


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
