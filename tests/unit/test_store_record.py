"""Record codec and signature of store/record.py: round trip, and every damaged record refused."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.errors import (
    InvalidCheckpoint,
    RecordBadSignature,
    RecordCorrupt,
    RecordError,
    RecordForeign,
    RecordTooLarge,
    RecordTruncated,
    RecordUnknownKey,
    RecordUnsigned,
)
from store.limits import DEFAULT_LIMITS, Limits
from store.record import MAGIC, Checkpoint, decode, encode, read_header
from store.signing import MAC_BYTES, KeyRing

KEYS = KeyRing(sign_with="k1", keys={"k1": b"a" * 32, "k0": b"b" * 32})
OTHER = KeyRing(sign_with="k1", keys={"k1": b"c" * 32})
U64 = st.integers(min_value=0, max_value=2**64 - 1)
NAME = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S"),
                           exclude_characters="{}*?[]\\"),
    min_size=1, max_size=40)


CONN = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S")),
               min_size=1, max_size=40)


@st.composite
def checkpoints(draw: st.DrawFn) -> Checkpoint:
    return Checkpoint(
        origin=draw(NAME), conn=draw(CONN), epoch=draw(U64), version=draw(U64),
        time_ns=draw(U64), inbound_consumed=draw(U64), outbound_produced=draw(U64),
        ici=draw(st.binary(max_size=200)), app_state=draw(st.binary(max_size=300)),
        send_queue=draw(st.binary(max_size=300)),
    )


def sample(**changes: object) -> Checkpoint:
    fields: dict[str, object] = dict(
        origin="origin-a", conn="10.77.1.2:40000>10.77.9.1:80", epoch=3, version=7,
        time_ns=1_700_000_000_000_000_000, inbound_consumed=100, outbound_produced=200,
        ici=b"ICI" * 20, app_state=b"state", send_queue=b"queued bytes")
    fields.update(changes)
    return Checkpoint(**fields)  # type: ignore[arg-type]


def unsigned(record: bytes) -> bytes:
    """The same record with key id and HMAC removed, as an unsigned writer would store it."""
    key_len = record[5]
    return record[:5] + b"\x00" + record[6 + key_len:-MAC_BYTES]


@given(checkpoints())
def test_record_round_trips_through_encode_and_decode(cp: Checkpoint) -> None:
    assert decode(encode(cp, KEYS), KEYS, origin=cp.origin, conn=cp.conn) == cp


@given(checkpoints(), st.data())
def test_any_flipped_byte_is_refused(cp: Checkpoint, data: st.DataObject) -> None:
    record = bytearray(encode(cp, KEYS))
    pos = data.draw(st.integers(0, len(record) - 1))
    record[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RecordError):
        decode(bytes(record), KEYS, origin=cp.origin, conn=cp.conn)


@given(checkpoints(), st.data())
def test_any_truncation_is_refused(cp: Checkpoint, data: st.DataObject) -> None:
    record = encode(cp, KEYS)
    cut = data.draw(st.integers(0, len(record) - 1))
    with pytest.raises(RecordError):
        decode(record[:cut], KEYS)


def test_truncation_inside_a_field_says_truncated() -> None:
    record = encode(sample(), KEYS)
    with pytest.raises(RecordTruncated, match="send_queue"):
        decode(record[:-MAC_BYTES - 3], KEYS)


def test_trailing_bytes_are_refused_as_corrupt() -> None:
    with pytest.raises(RecordCorrupt, match="trailing"):
        decode(encode(sample(), KEYS) + b"x", KEYS)


def test_bad_magic_is_refused_as_corrupt() -> None:
    with pytest.raises(RecordCorrupt, match="must start with"):
        decode(b"XXXX" + encode(sample(), KEYS)[4:], KEYS)


def test_unknown_format_version_is_refused_as_corrupt() -> None:
    record = encode(sample(), KEYS)
    with pytest.raises(RecordCorrupt, match="format must be 1, got 9"):
        decode(record[:4] + b"\x09" + record[5:], KEYS)


def test_unsigned_record_is_refused() -> None:
    record = unsigned(encode(sample(), KEYS))
    assert read_header(record).key_id == ""
    with pytest.raises(RecordUnsigned):
        decode(record, KEYS)


def test_record_signed_with_another_secret_is_refused() -> None:
    with pytest.raises(RecordBadSignature):
        decode(encode(sample(), OTHER), KEYS)


def test_record_signed_with_an_unknown_key_id_is_refused() -> None:
    stranger = KeyRing(sign_with="k9", keys={"k9": b"a" * 32})
    with pytest.raises(RecordUnknownKey, match="k9"):
        decode(encode(sample(), stranger), KEYS)


def test_record_signed_with_a_rotated_out_but_listed_key_is_accepted() -> None:
    old = KeyRing(sign_with="k0", keys={"k0": b"b" * 32})
    assert decode(encode(sample(), old), KEYS) == sample()


def test_record_stored_under_another_connection_is_refused_as_foreign() -> None:
    record = encode(sample(), KEYS)
    with pytest.raises(RecordForeign, match="signed for"):
        decode(record, KEYS, origin="origin-a", conn="10.77.1.2:40001>10.77.9.1:80")
    with pytest.raises(RecordForeign):
        decode(record, KEYS, origin="origin-b")


def test_oversized_record_is_refused_on_read_before_parsing() -> None:
    small = Limits(max_record=100)
    with pytest.raises(RecordTooLarge, match="at most 100 bytes"):
        decode(encode(sample(send_queue=b"q" * 200), KEYS), KEYS, limits=small)


def test_oversized_field_declared_in_record_is_refused() -> None:
    small = Limits(max_send_queue=10)
    with pytest.raises(RecordTooLarge, match="send_queue must be at most 10"):
        decode(encode(sample(send_queue=b"q" * 11), KEYS), KEYS, limits=small)


def test_oversized_checkpoint_is_refused_on_write() -> None:
    with pytest.raises(RecordTooLarge, match="app_state"):
        encode(sample(app_state=b"s" * 65), KEYS, Limits(max_app_state=64))
    with pytest.raises(RecordTooLarge, match="record must be at most"):
        encode(sample(app_state=b"s" * 500), KEYS, Limits(max_record=300))


def test_huge_declared_length_is_refused_without_allocating() -> None:
    record = encode(sample(ici=b"", app_state=b"", send_queue=b""), KEYS)
    body = record[:-MAC_BYTES - 4] + struct.pack("!I", 2**32 - 1)
    with pytest.raises(RecordTooLarge):
        decode(body, KEYS)


@pytest.mark.parametrize("field,value", [("epoch", -1), ("version", 2**64), ("time_ns", 1.5),
                                         ("inbound_consumed", True)])
def test_checkpoint_with_out_of_range_number_is_invalid(field: str, value: object) -> None:
    with pytest.raises(InvalidCheckpoint, match=field):
        sample(**{field: value})


def test_ipv6_connection_name_with_brackets_round_trips() -> None:
    conn = "[fd77:1::2]:40000>[fd77:9::1]:80"
    assert decode(encode(sample(conn=conn), KEYS), KEYS, conn=conn).conn == conn


def test_checkpoint_with_hash_tag_braces_in_origin_is_invalid() -> None:
    with pytest.raises(InvalidCheckpoint, match="origin"):
        sample(origin="a{b}")


@settings(max_examples=500)
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: MAGIC + b),
    st.binary(max_size=300).map(lambda b: MAGIC + b"\x01" + b),
    st.binary(max_size=300).map(lambda b: MAGIC + b"\x01\x02k1" + b),
    st.builds(lambda s, n: s[:n], st.just(encode(sample(), KEYS)), st.integers(0, 200)),
    st.none(), st.integers(), st.text(max_size=20),
))
def test_read_path_fuzz_raises_nothing_but_record_errors(data: object) -> None:
    # none of these can carry a valid signature, so decode must refuse every one, and only
    # with a RecordError; read_header (no signature check) may accept but never raise others
    with pytest.raises(RecordError):
        decode(data, KEYS, origin="origin-a")  # type: ignore[arg-type]
    with contextlib.suppress(RecordError):
        read_header(data)  # type: ignore[arg-type]


def test_store_limits_hold_every_ici_the_default_restore_policy_accepts() -> None:
    """The ICI carries both queues: max_ici must fit the largest one the policy lets through."""
    from kernel.codec import max_encoded_size
    from kernel.sanity import RestorePolicy

    policy = RestorePolicy.serving("10.77.9.1")
    largest = max_encoded_size(policy.max_send_queue, policy.max_recv_queue)
    assert largest <= DEFAULT_LIMITS.max_ici < largest + 1024
    assert DEFAULT_LIMITS.max_record >= (DEFAULT_LIMITS.max_ici + DEFAULT_LIMITS.max_app_state
                                         + DEFAULT_LIMITS.max_send_queue)
