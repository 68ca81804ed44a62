"""Property tests of the passing transfer format (a batch of ICIs with application states)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.codec import IciDecodeError
from kernel.passing import (
    Handoff,
    PassingError,
    RestoreReport,
    decode_batch,
    encode_batch,
)
from tests.unit.test_ici_codec import icis

handoffs = st.lists(st.builds(Handoff, icis, st.binary(max_size=200)), max_size=5)


@given(handoffs)
def test_every_batch_decodes_to_itself(items: list[Handoff]) -> None:
    assert decode_batch(encode_batch(items)) == items


@given(st.binary(max_size=500))
def test_random_bytes_raise_only_the_transfer_errors(data: bytes) -> None:
    with pytest.raises((PassingError, IciDecodeError)):
        decode_batch(data)


@given(handoffs, st.data())
def test_a_changed_or_truncated_batch_is_refused(items: list[Handoff], data: st.DataObject) -> None:
    raw = bytearray(encode_batch(items))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    else:
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    with pytest.raises((PassingError, IciDecodeError)):
        decode_batch(bytes(raw))


@given(st.lists(st.integers(0, 10_000), max_size=20),
       st.lists(st.tuples(st.integers(0, 10_000), st.text(max_size=50)), max_size=5))
def test_restore_report_round_trips_through_its_json_line(
    restored: list[int], refused: list[tuple[int, str]]
) -> None:
    report = RestoreReport(tuple(restored), tuple(refused))
    line = report.to_json()
    assert line.endswith(b"\n")
    assert RestoreReport.from_json(line) == report


def test_a_garbled_report_names_what_was_expected() -> None:
    with pytest.raises(PassingError, match="expected JSON restored/refused"):
        RestoreReport.from_json(b"not json\n")
