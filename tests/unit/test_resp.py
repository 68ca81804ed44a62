"""Property tests of the RESP request parser and reply encoders (ops/apps/resp.py): commands
round-trip however the stream is split, `consumed` counts exactly the bytes of the commands
returned, garbage raises ProtocolError and nothing else, and the bounds refuse a request before
the bytes it announces arrive."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ops.apps import resp
from ops.apps.resp import Limits, ProtocolError, RequestParser
from tests.test_layers import IO_MODULES, ROOT, imports

args = st.binary(max_size=40)
commands = st.lists(args, min_size=1, max_size=8).map(tuple)
inline_words = st.binary(min_size=1, max_size=12).filter(
    lambda w: not any(c in w for c in b" \t\n\r\v\f\"'*"))


def feed_split(data: bytes, cuts: list[int], parser: RequestParser | None = None
               ) -> tuple[list[resp.Command], list[int]]:
    """Feed data cut at the given points; the commands and `consumed` after each feed."""
    parser = parser or RequestParser()
    got, consumed = [], [parser.consumed]
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        parser.feed(data[start:end])
        got += list(parser)
        consumed.append(parser.consumed)
    return got, consumed


def quote(arg: bytes) -> bytes:
    """arg in double quotes, as redis-cli would write it on an inline line."""
    return b'"' + b"".join(b"\\x%02x" % c if c < 32 or c > 126 or c in b'"\\' else bytes([c])
                           for c in arg) + b'"'


def test_the_resp_module_and_the_http_module_are_pure() -> None:
    for module in ("ops/apps/resp.py", "ops/apps/httpwire.py"):
        bad = [f"{module}:{line} imports {mod}" for line, mod in imports(ROOT / module)
               if mod in IO_MODULES or mod.split(".")[0] in IO_MODULES]
        assert bad == []


@given(st.lists(commands, max_size=12), st.lists(st.integers(0, 10_000), max_size=20))
def test_commands_round_trip_however_the_stream_is_split(
        cmds: list[resp.Command], cuts: list[int]) -> None:
    encoded = [resp.command(*c) for c in cmds]
    data = b"".join(encoded)
    got, consumed = feed_split(data, cuts)
    assert got == cmds
    ends = {sum(len(e) for e in encoded[:i]) for i in range(len(encoded) + 1)}
    assert set(consumed) <= ends and consumed[-1] == len(data)


@given(commands, st.integers(0, 200))
def test_an_incomplete_command_is_pending_and_not_consumed(cmd: resp.Command, cut: int) -> None:
    data = resp.command(*cmd)
    cut %= len(data)
    parser = RequestParser()
    parser.feed(data[:cut])
    assert list(parser) == [] and parser.consumed == 0 and parser.pending == data[:cut]
    parser.feed(data[cut:])
    assert list(parser) == [cmd] and parser.consumed == len(data) and parser.pending == b""


@given(st.lists(st.lists(st.one_of(inline_words, args.map(quote)), min_size=1, max_size=6),
                max_size=6),
       st.lists(st.integers(0, 10_000), max_size=10), st.sampled_from([b"\r\n", b"\n"]))
def test_inline_commands_split_as_redis_splits_them(
        lines: list[list[bytes]], cuts: list[int], newline: bytes) -> None:
    data = b"".join(b" ".join(words) + newline for words in lines)
    want = [tuple(w[1:-1].decode("unicode_escape").encode("latin-1") if w.startswith(b'"')
                  else w for w in words) for words in lines]
    got, consumed = feed_split(data, cuts)
    assert got == want and consumed[-1] == len(data)


def test_inline_quotes_and_escapes() -> None:
    line = b"SET 'it\\'s' \"a\\tb\\x41\\\"\" c\"d e\"\r\n"
    assert resp.parse(line) == ([(b"SET", b"it's", b"a\tbA\"", b"cd e")], len(line))


@pytest.mark.parametrize("line", [b'SET "abc\r\n', b"SET 'abc\r\n", b'SET "a"b\r\n',
                                  b"SET 'a'b\r\n"])
def test_unbalanced_quotes_are_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="quote"):
        resp.parse(line)


def test_empty_arrays_and_blank_lines_are_skipped_but_consumed() -> None:
    data = b"*0\r\n*-1\r\n\r\n  \n" + resp.command(b"PING")
    assert resp.parse(data) == ([(b"PING",)], len(data))


def test_commands_before_garbage_are_returned_and_consumed_stops_at_it() -> None:
    parser = RequestParser()
    good = resp.command(b"INCR", b"x")
    parser.feed(good + b"*1\r\n:7\r\n")
    it = iter(parser)
    assert next(it) == (b"INCR", b"x")
    with pytest.raises(ProtocolError, match="expected a bulk string header"):
        next(it)
    assert parser.consumed == len(good)


@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=10))
def test_garbage_raises_protocol_error_and_nothing_else(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(ProtocolError):
        feed_split(data, cuts, RequestParser(Limits(max_args=8, max_bulk=64, max_command=128,
                                                    max_inline=100)))


@given(st.lists(commands, min_size=1, max_size=4), st.data())
def test_corrupted_requests_raise_protocol_error_and_nothing_else(
        cmds: list[resp.Command], data: st.DataObject) -> None:
    stream = bytearray(b"".join(resp.command(*c) for c in cmds))
    for _ in range(data.draw(st.integers(1, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    cuts = data.draw(st.lists(st.integers(0, 1000), max_size=5))
    with contextlib.suppress(ProtocolError):
        feed_split(bytes(stream), cuts)


@given(commands, st.data())
def test_a_stream_that_errs_errs_however_it_is_split(cmd: resp.Command,
                                                     data: st.DataObject) -> None:
    stream = bytearray(resp.command(*cmd) * 2)
    stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    outcomes: list[list[resp.Command] | None] = []
    for cuts in ([], data.draw(st.lists(st.integers(0, 1000), max_size=6))):
        try:
            outcomes.append(feed_split(bytes(stream) + b"\r\n", cuts)[0])
        except ProtocolError:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(("data", "match"), [
    (b"*1025\r\n", "at most 1024 arguments"),
    (b"*1\r\n$1048577\r\n", "at most 1048576 bytes"),
    (b"*99999999999999999999999999999999", "within 32 bytes"),
    (b"*2\r\n$3\r\nGET\r\n$x", "bulk string header '\\$<length>' as decimal digits"),
    (b"*2\r\n$01\r\n", "decimal digits"),
    (b"*1\r\n$-1\r\n", "decimal digits"),
    (b"*1\r\n$3\r\nGETX", "CRLF after a bulk string of 3 bytes"),
    (b"*1x", "array length"),
    (b"A" * (64 << 10), "inline command of at most 65536 bytes"),
])
def test_bounds_and_malformed_headers_are_refused_before_the_bytes_they_announce(
        data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        resp.parse(data)


def test_a_command_larger_than_max_command_is_refused_at_its_header() -> None:
    parser = RequestParser(Limits(max_bulk=1000, max_command=100))
    parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$90\r\n")
    with pytest.raises(ProtocolError, match="a command of at most 100 bytes"):
        list(parser)


def test_an_incomplete_inline_line_below_the_bound_waits() -> None:
    parser = RequestParser()
    parser.feed(b"A" * ((64 << 10) - 1))
    assert list(parser) == [] and len(parser.pending) == (64 << 10) - 1


@given(st.binary(max_size=200))
def test_bulk_replies_carry_any_bytes(data: bytes) -> None:
    assert resp.bulk(data) == b"$%d\r\n" % len(data) + data + b"\r\n"


def test_reply_encoders() -> None:
    assert resp.simple("OK") == b"+OK\r\n"
    assert resp.error("ERR bad\r\nthing") == b"-ERR bad  thing\r\n"
    assert resp.integer(-42) == b":-42\r\n"
    assert resp.bulk(None) == resp.NULL_BULK == b"$-1\r\n"
    assert resp.array([resp.integer(1), resp.bulk(b"x")]) == b"*2\r\n:1\r\n$1\r\nx\r\n"
    assert resp.array([]) == resp.EMPTY_ARRAY
    with pytest.raises(ValueError, match="cannot hold CR or LF"):
        resp.simple("a\nb")


def test_quit_closes_the_connection_and_nothing_else_does() -> None:
    assert resp.closes_connection((b"quit",)) and not resp.closes_connection((b"GET", b"quit"))
