"""Output log entries (store/outlog.py): round trip, and every damaged or misplaced entry refused;
output log key names; the translation of the library's append statuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.client import _output_refusal, _put_output_refusal, _stream_offset
from store.errors import (
    InvalidCheckpoint,
    OutputOffsetRefused,
    OutputTooLarge,
    RecordBadSignature,
    RecordCorrupt,
    RecordError,
    RecordForeign,
    RecordTooLarge,
    RecordUnknownKey,
    RecordUnsigned,
    StoreConfigError,
    TooManyRecords,
    VersionNotNewer,
    WriteRefused,
)
from store.keys import OriginKeys, origin_of_meta_key
from store.limits import DEFAULT_LIMITS, Limits
from store.outlog import OutputRange, decode_output, encode_output
from store.record import Checkpoint
from store.record import encode as encode_record
from store.signing import MAC_BYTES, KeyRing
from tests.unit.test_store_record import CONN, NAME

KEYS = KeyRing(sign_with="k1", keys={"k1": b"a" * 32, "k0": b"b" * 32})
OTHER = KeyRing(sign_with="k1", keys={"k1": b"c" * 32})
U64 = 2**64 - 1


@st.composite
def ranges(draw: st.DrawFn) -> OutputRange:
    data = draw(st.binary(max_size=300))
    return OutputRange(origin=draw(NAME), conn=draw(CONN), epoch=draw(st.integers(0, U64)),
                       offset=draw(st.integers(0, U64 - len(data))), data=data)


def sample(**changes: object) -> OutputRange:
    fields: dict[str, object] = dict(origin="origin-a", conn="10.77.1.2:40000>10.77.9.1:80",
                                     epoch=3, offset=1000, data=b"HTTP/1.1 200 OK\r\n")
    fields.update(changes)
    return OutputRange(**fields)  # type: ignore[arg-type]


def read(entry: bytes, r: OutputRange, limits: Limits = DEFAULT_LIMITS) -> OutputRange:
    return decode_output(entry, KEYS, origin=r.origin, conn=r.conn, offset=r.offset,
                         limits=limits)


@given(ranges())
def test_entry_round_trips_through_encode_and_decode(r: OutputRange) -> None:
    assert read(encode_output(r, KEYS), r) == r


@given(ranges(), st.data())
def test_any_changed_byte_is_refused(r: OutputRange, data: st.DataObject) -> None:
    entry = bytearray(encode_output(r, KEYS))
    pos = data.draw(st.integers(0, len(entry) - 1))
    entry[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RecordError):
        read(bytes(entry), r)


@given(ranges(), st.data())
def test_any_truncation_or_extension_is_refused(r: OutputRange, data: st.DataObject) -> None:
    entry = encode_output(r, KEYS)
    with pytest.raises(RecordError):
        read(entry[:data.draw(st.integers(0, len(entry) - 1))], r)
    with pytest.raises(RecordCorrupt, match="trailing"):
        read(entry + data.draw(st.binary(min_size=1, max_size=5)), r)


@given(ranges(), st.data())
def test_range_presented_under_another_origin_conn_or_offset_is_refused_as_foreign(
        r: OutputRange, data: st.DataObject) -> None:
    entry = encode_output(r, KEYS)
    origin = data.draw(NAME.filter(lambda o: o != r.origin))
    conn = data.draw(CONN.filter(lambda c: c != r.conn))
    offset = data.draw(st.integers(0, U64).filter(lambda o: o != r.offset))
    with pytest.raises(RecordForeign, match="origin"):
        decode_output(entry, KEYS, origin=origin, conn=r.conn, offset=r.offset)
    with pytest.raises(RecordForeign, match="connection"):
        decode_output(entry, KEYS, origin=r.origin, conn=conn, offset=r.offset)
    with pytest.raises(RecordForeign, match=f"signed for offset {r.offset}"):
        decode_output(entry, KEYS, origin=r.origin, conn=r.conn, offset=offset)


def test_entry_signed_with_another_secret_an_unknown_key_or_none_is_refused() -> None:
    r = sample()
    with pytest.raises(RecordBadSignature):
        read(encode_output(r, OTHER), r)
    with pytest.raises(RecordUnknownKey, match="k9"):
        read(encode_output(r, KeyRing(sign_with="k9", keys={"k9": b"a" * 32})), r)
    entry = encode_output(r, KEYS)
    unsigned = entry[:5] + b"\x00" + entry[6 + entry[5]:-MAC_BYTES]
    with pytest.raises(RecordUnsigned):
        read(unsigned, r)
    old = KeyRing(sign_with="k0", keys={"k0": b"b" * 32})  # rotated out but still listed
    assert read(encode_output(r, old), r) == r


def test_record_bytes_are_not_taken_for_an_entry() -> None:
    cp = Checkpoint(origin="origin-a", conn="c", epoch=1, version=1, time_ns=0,
                    inbound_consumed=0, outbound_produced=0, ici=b"", app_state=b"",
                    send_queue=b"")
    with pytest.raises(RecordCorrupt, match="must start with b'TCPO'"):
        decode_output(encode_record(cp, KEYS), KEYS, origin="origin-a", conn="c", offset=0)


def test_append_above_its_limit_is_refused_on_write_and_on_read_naming_the_limit() -> None:
    small = Limits(max_output_append=8, max_output_held=64)
    with pytest.raises(OutputTooLarge, match="max_output_append = 8 bytes, got 9") as info:
        encode_output(sample(data=b"x" * 9), KEYS, small)
    assert (info.value.limit, info.value.size, info.value.maximum) == ("max_output_append", 9, 8)
    r = sample(data=b"x" * 9)
    with pytest.raises(RecordTooLarge, match="max_output_append = 8"):
        read(encode_output(r, KEYS), r, small)


@pytest.mark.parametrize("changes,field", [
    ({"offset": -1}, "offset"), ({"epoch": 2**64}, "epoch"), ({"offset": True}, "offset"),
    ({"offset": U64, "data": b"x"}, "end at most"), ({"data": "text"}, "data"),
    ({"origin": "a{b}"}, "origin"), ({"conn": "with space"}, "connection"),
])
def test_out_of_range_output_range_is_invalid(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidCheckpoint, match=field):
        sample(**changes)


def test_range_may_end_exactly_at_the_last_u64_offset() -> None:
    r = sample(offset=U64 - 3, data=b"abc")
    assert r.end == U64 and read(encode_output(r, KEYS), r) == r


@given(CONN)
def test_output_log_key_shares_the_origin_hash_tag_and_is_never_taken_for_a_meta_key(
        conn: str) -> None:
    keys = OriginKeys("origin-a")
    key = keys.output(conn)
    assert key.startswith("tcpcp:{origin-a}:out:")
    assert key.index("}") == len("tcpcp:{origin-a") and key.count("}") == 1
    assert not any(c in key[len(keys.tag):] for c in "{}*?[]\\ ")
    assert origin_of_meta_key(key) is None and origin_of_meta_key(key + ":meta") is None


def test_ipv4_connection_names_stay_readable_in_output_log_keys() -> None:
    keys = OriginKeys("origin-a")
    assert keys.output("10.77.1.2:40000>10.77.9.1:80") == \
        "tcpcp:{origin-a}:out:10.77.1.2:40000>10.77.9.1:80"
    assert keys.output("[fd77:1::2]:40000>[fd77:9::1]:80") == \
        "tcpcp:{origin-a}:out:%5Bfd77:1::2%5D:40000>%5Bfd77:9::1%5D:80"
    assert keys.output("a%5B") != keys.output("a[")


def test_output_limits_must_be_consistent() -> None:
    with pytest.raises(StoreConfigError, match="max_output_held"):
        Limits(max_output_append=100, max_output_held=10)
    with pytest.raises(StoreConfigError, match="max_output_entries"):
        Limits(max_output_entries=0)


@pytest.mark.parametrize("status,kind,limit,text", [
    ("OFFSET 120", OutputOffsetRefused, None, "must start where the log ends, at 120, got "
                                              "offset 100 (an overlap"),
    ("OFFSET 90", OutputOffsetRefused, None, "at 90, got offset 100 (a gap"),
    ("TOO_LARGE_APPEND 20", OutputTooLarge, "max_output_append", "max_output_append = "),
    ("FULL 2040", OutputTooLarge, "max_output_held", "holds 2040 and the append adds 20"),
    ("TOO_MANY_ENTRIES 7", OutputTooLarge, "max_output_entries", "holds 7"),
    ("TOO_MANY_LOGS 5", TooManyRecords, None, "output logs, has 5"),
    ("SOMETHING_NEW", WriteRefused, None, "SOMETHING_NEW"),
])
def test_append_statuses_map_to_their_exceptions(status: str, kind: type, limit: str | None,
                                                 text: str) -> None:
    exc = _output_refusal(status, "o", "c", 100, 20, Limits())
    assert type(exc) is kind and text in str(exc)
    if isinstance(exc, OutputTooLarge):
        assert exc.limit == limit and exc.maximum == getattr(Limits(), limit or "")
    if isinstance(exc, OutputOffsetRefused):
        assert exc.given == 100 and exc.end == int(status.split()[1])


def test_record_and_append_refusal_names_the_record_first() -> None:
    cp = Checkpoint(origin="o", conn="c", epoch=1, version=3, time_ns=0, inbound_consumed=0,
                    outbound_produced=0, ici=b"", app_state=b"", send_queue=b"")
    assert isinstance(_put_output_refusal("VERSION_NOT_NEWER 9", cp, 0, 1, Limits()),
                      VersionNotNewer)
    assert isinstance(_put_output_refusal("OFFSET 9", cp, 0, 1, Limits()), OutputOffsetRefused)


@pytest.mark.parametrize("raw", [b"12-0", b"12", b"-1", b"x-1", b"12-1-1"])
def test_stream_ids_other_than_offset_dash_1_are_corrupt(raw: bytes) -> None:
    with pytest.raises(RecordCorrupt, match="<offset>-1"):
        _stream_offset(raw, "o", "c")
    assert _stream_offset(b"18446744073709551615-1", "o", "c") == U64
