"""Property tests of the checkpointer's local API frames (checkpointer/api.py): every request and
reply round-trips with its request id, any other bytes raise only ApiError, and sizes beyond the
limits are refused from the header or the length field, before the bytes they announce."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpointer import api
from checkpointer.api import (
    HEADER,
    REPLIES,
    REQUESTS,
    ApiError,
    Close,
    Commit,
    Committed,
    Contract,
    Direction,
    Done,
    EndOfStream,
    Error,
    ErrorCode,
    Hello,
    HelloOk,
    Kind,
    Limits,
    RegisterConnection,
    Registered,
    RegisterListener,
)

LIMITS = Limits(max_frame=4096, max_state=1024, max_outbound=2048, max_connections=100)
ids = st.integers(1, 2**64 - 1)
positions = st.integers(0, 2**64 - 1)
request_ids = st.integers(0, 2**32 - 1)
contracts = st.sampled_from(Contract)


@st.composite
def commits(draw: st.DrawFn) -> Commit:
    produced = draw(positions)
    outbound = draw(st.none() | st.binary(max_size=min(produced, 64)))
    return Commit(draw(ids), draw(st.binary(max_size=64)), draw(positions), produced,
                  draw(st.booleans()), outbound)


requests = st.one_of(
    st.builds(Hello, st.lists(st.integers(1, 255), min_size=1, max_size=16).map(tuple),
              st.text(max_size=20)),
    st.builds(RegisterConnection, positions, positions, contracts, st.binary(max_size=64)),
    st.builds(RegisterListener, contracts),
    commits(),
    st.builds(EndOfStream, ids, st.sampled_from(Direction), positions),
    st.builds(Close, ids),
)
limits = st.builds(Limits, st.integers(1 << 20, 1 << 24), st.integers(1, 1 << 16),
                   st.integers(1, 1 << 16), st.integers(1, 2**32 - 1))
replies = st.one_of(
    st.builds(HelloOk, st.integers(1, 255), limits),
    st.builds(Registered, ids),
    st.builds(Committed, ids, positions, positions),
    st.builds(Done, ids),
    st.builds(Error, st.sampled_from(ErrorCode), st.text(max_size=40)),
)


@given(requests, request_ids)
def test_every_request_round_trips_with_its_request_id(req: api.Request, rid: int) -> None:
    data = api.encode(req, rid, limits=LIMITS)
    assert api.parse_request(data, LIMITS, version=1) == (rid, req)


@given(replies, request_ids)
def test_every_reply_round_trips_with_its_request_id(reply: api.Reply, rid: int) -> None:
    data = api.encode(reply, rid, limits=LIMITS)
    assert api.parse_reply(data, LIMITS, version=1) == (rid, reply)


@given(st.binary(max_size=200), st.sampled_from([None, 1]))
def test_random_bytes_raise_only_api_error(data: bytes, version: int | None) -> None:
    for parse in (api.parse_request, api.parse_reply):
        with contextlib.suppress(ApiError):
            parse(data, LIMITS, version)


@given(st.binary(max_size=120), st.sampled_from(sorted(Kind)), request_ids)
def test_random_bodies_behind_a_valid_header_raise_only_api_error(body: bytes, kind: Kind,
                                                                  rid: int) -> None:
    version = 0 if kind in (Kind.HELLO, Kind.HELLO_OK) else 1
    data = HEADER.pack(api.MAGIC, version, kind, 0, rid, len(body)) + body
    parse = api.parse_request if kind in REQUESTS else api.parse_reply
    try:
        parse(data, LIMITS, 1)
    except ApiError as exc:
        assert exc.request_id == rid


@given(requests | replies, request_ids, st.data())
def test_a_truncated_frame_is_refused(msg: api.Request | api.Reply, rid: int,
                                      data: st.DataObject) -> None:
    raw = api.encode(msg, rid, limits=LIMITS)
    cut = data.draw(st.integers(0, len(raw) - 1))
    parse = api.parse_request if api.kind_of(msg) in REQUESTS else api.parse_reply
    with pytest.raises(ApiError):
        parse(raw[:cut], LIMITS, 1)


@given(requests | replies, request_ids, st.data())
def test_a_changed_byte_is_refused_or_decodes_to_a_valid_message(
        msg: api.Request | api.Reply, rid: int, data: st.DataObject) -> None:
    raw = bytearray(api.encode(msg, rid, limits=LIMITS))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    parse = api.parse_request if api.kind_of(msg) in REQUESTS else api.parse_reply
    try:
        _, out = parse(bytes(raw), LIMITS, 1)
    except ApiError:
        return
    assert api.encode(out, _rid(raw), version=raw[4], limits=LIMITS) == bytes(raw)


def _rid(raw: bytearray) -> int:
    return int(struct.unpack_from("!I", raw, 8)[0])


@given(st.integers(0, 2**32 - 1), st.sampled_from(sorted(REQUESTS)))
def test_a_length_beyond_the_kind_s_bound_is_refused_from_the_header_alone(length: int,
                                                                           kind: Kind) -> None:
    version = 0 if kind is Kind.HELLO else 1
    head = HEADER.pack(api.MAGIC, version, kind, 0, 7, length)
    cap = min(api.max_body(kind, LIMITS), LIMITS.max_frame - HEADER.size)
    if length <= cap:
        assert api.read_header(head, LIMITS, version=1).length == length
        return
    with pytest.raises(ApiError) as err:
        api.read_header(head, LIMITS, version=1)
    assert err.value.code is ErrorCode.TOO_LARGE and err.value.request_id == 7
    assert f"announced {length}" in err.value.message


def test_the_default_limit_is_one_mebibyte_per_frame() -> None:
    head = HEADER.pack(api.MAGIC, 1, Kind.COMMIT, 0, 1, (1 << 20) - HEADER.size + 1)
    with pytest.raises(ApiError, match="at most") as err:
        api.read_header(head, Limits(), version=1)
    assert err.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize("field", ["state", "outbound"])
def test_a_blob_length_beyond_the_limit_is_refused_before_its_bytes(field: str) -> None:
    # the announced blob is not there at all: the length alone is refused, not "truncated"
    fixed = struct.pack("!QQQB", 5, 0, 4096, 2)
    if field == "state":
        body = fixed + struct.pack("!I", LIMITS.max_state + 1)
    else:
        body = fixed + struct.pack("!I", 0) + struct.pack("!I", LIMITS.max_outbound + 1)
    header = api.Header(1, Kind.COMMIT, 9, len(body))
    with pytest.raises(ApiError) as err:
        api.decode_request(header, body, LIMITS)
    assert err.value.code is ErrorCode.TOO_LARGE and field in err.value.message
    assert err.value.request_id == 9


def test_an_oversized_state_is_refused_by_the_sender_too() -> None:
    with pytest.raises(ApiError) as err:
        api.encode(Commit(1, b"x" * (LIMITS.max_state + 1), 0, 0), 1, limits=LIMITS)
    assert err.value.code is ErrorCode.TOO_LARGE
    assert "state of at most 1024 bytes expected, got 1025" in err.value.message


def test_hello_negotiates_the_highest_common_version_or_names_both_lists() -> None:
    assert api.negotiate((1, 2, 3), (1, 2)) == 2
    with pytest.raises(ApiError) as err:
        api.negotiate((4, 5), (1, 2))
    assert err.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert err.value.message == "expected one of versions 1, 2, got 4, 5"


def test_hello_and_its_answer_carry_version_zero_and_other_frames_the_negotiated_one() -> None:
    assert api.encode(Hello((1, 2)), 1)[4] == 0
    assert api.encode(HelloOk(1, Limits()), 1, version=1)[4] == 0
    assert api.encode(Close(3), 1, version=1)[4] == 1
    assert api.encode(Error(ErrorCode.NOT_NEGOTIATED, "x"), 1, version=0)[4] == 0
    with pytest.raises(ApiError) as err:
        api.encode(Close(3), 1, version=0)
    assert err.value.code is ErrorCode.NOT_NEGOTIATED


def test_a_request_before_hello_is_refused_naming_hello() -> None:
    with pytest.raises(ApiError) as err:
        api.parse_request(api.encode(Close(3), 4), LIMITS, version=None)
    assert err.value.code is ErrorCode.NOT_NEGOTIATED and err.value.request_id == 4
    assert "expected HELLO first" in err.value.message
    assert api.parse_request(api.encode(Hello(), 5), LIMITS, version=None) == (5, Hello())


def test_a_frame_of_another_version_is_refused_naming_both() -> None:
    raw = bytearray(api.encode(Close(3), 4))
    raw[4] = 2
    with pytest.raises(ApiError) as err:
        api.parse_request(bytes(raw), LIMITS, version=1)
    assert err.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert "expected version 1 (negotiated), got 2" in err.value.message


def test_a_reply_kind_where_a_request_is_expected_is_refused() -> None:
    with pytest.raises(ApiError) as err:
        api.parse_request(api.encode(Done(3), 4), LIMITS, version=1)
    assert err.value.code is ErrorCode.UNKNOWN_KIND
    assert "got DONE" in err.value.message and "HELLO" in err.value.message


def test_bad_magic_names_what_was_expected() -> None:
    raw = b"HTTP" + api.encode(Close(3), 4)[4:]
    with pytest.raises(ApiError, match="expected magic b'TCPA', got b'HTTP'"):
        api.parse_request(raw, LIMITS, version=1)


def test_an_unknown_contract_names_the_field_and_the_choices() -> None:
    raw = bytearray(api.encode(RegisterListener(Contract.LOGGED), 4))
    raw[-1] = 9
    with pytest.raises(ApiError) as err:
        api.parse_request(bytes(raw), LIMITS, version=1)
    assert err.value.code is ErrorCode.MALFORMED
    assert "contract: expected one of 1 (REGENERABLE), 2 (LOGGED), got 9" in err.value.message


def test_outbound_bytes_beyond_what_was_produced_are_a_bad_position() -> None:
    with pytest.raises(ApiError) as err:
        Commit(1, b"", 0, 3, outbound=b"abcd")
    assert err.value.code is ErrorCode.BAD_POSITION


def test_connection_id_zero_is_never_valid() -> None:
    raw = bytearray(api.encode(Close(1), 4))
    raw[-1] = 0
    with pytest.raises(ApiError, match="id: expected 1"):
        api.parse_request(bytes(raw), LIMITS, version=1)


def test_register_requests_expect_one_descriptor_and_others_none() -> None:
    assert {k: api.descriptors_for(k) for k in REQUESTS | REPLIES if api.descriptors_for(k)} \
        == {Kind.REGISTER_CONNECTION: 1, Kind.REGISTER_LISTENER: 1}


def test_an_error_reply_carries_the_code_and_a_message_cut_to_the_bound() -> None:
    exc = ApiError(ErrorCode.NOT_GUARDED, "é" * 2000, 12)
    reply = Error.of(exc)
    assert len(reply.message.encode()) <= api.MAX_MESSAGE
    _, back = api.parse_reply(api.encode(reply, 12), LIMITS, version=1)
    assert isinstance(back, Error) and back.exception(12).code is ErrorCode.NOT_GUARDED


def test_limits_that_cannot_hold_a_full_commit_are_refused() -> None:
    with pytest.raises(ApiError, match="max_frame: expected at least"):
        Limits(max_frame=1000, max_state=1000, max_outbound=1000)
    with pytest.raises(ApiError, match="max_connections"):
        Limits(max_connections=0)
