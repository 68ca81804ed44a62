"""Property tests of the file server's HTTP/1.1 wire code (ops/apps/httpwire.py): a request head
parses the same whatever prefix of it has arrived (None until complete, never an error), garbage
raises HttpError with a status and nothing else, the head's bound holds, ranges stay inside the
content, and response heads are well-formed."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ops.apps import httpwire
from ops.apps.httpwire import HttpError, Request, file_name, parse_head, parse_range

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TCHAR, min_size=1, max_size=12)
targets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                  max_size=40)
field_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                     blacklist_characters="\x7f"), max_size=30).map(str.strip)
extra_fields = st.lists(st.tuples(tokens.filter(
    lambda n: n.lower() not in ("host", "content-length", "transfer-encoding")), field_values),
    max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, Request]:
    method = draw(tokens)
    target = draw(targets)
    fields = [("Host", draw(field_values)), *draw(extra_fields)]
    length = draw(st.none() | st.integers(0, 10**12))
    if length is not None:
        fields.append(("Content-Length", str(length)))
    fields = draw(st.permutations(fields))
    head = (f"{method} {target} HTTP/1.1\r\n"
            + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n").encode("latin-1")
    want = Request(method, target, (1, 1), tuple((n.lower(), v) for n, v in fields))
    return head, want


@given(requests(), st.binary(max_size=20))
def test_a_head_parses_whole_and_every_prefix_is_incomplete(
        got: tuple[bytes, Request], body: bytes) -> None:
    head, want = got
    for cut in range(len(head)):
        assert parse_head(head[:cut]) is None
    assert parse_head(head + body) == (want, len(head))


def test_curls_upload_head() -> None:
    head = (b"PUT /big%20file.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\n"
            b"Accept: */*\r\nContent-Length: 1048576\r\nExpect: 100-continue\r\n\r\n")
    request, length = parse_head(head + b"xx") or pytest.fail("incomplete")
    assert length == len(head) and request.method == "PUT"
    assert request.content_length == 1048576 and request.expect_continue and request.keep_alive
    assert file_name(request.target) == "big file.bin"


def test_empty_lines_before_the_request_line_are_skipped_and_counted() -> None:
    head = b"\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    assert parse_head(head) == (Request("GET", "/a", (1, 1), (("host", "x"),)), len(head))


@pytest.mark.parametrize(("version", "connection", "keep"), [
    ("1.1", None, True), ("1.1", "close", False), ("1.1", "Keep-Alive, Close", False),
    ("1.0", None, False), ("1.0", "keep-alive", True)])
def test_keep_alive_follows_the_version_and_connection(version: str, connection: str | None,
                                                       keep: bool) -> None:
    fields = "Host: x\r\n" + (f"Connection: {connection}\r\n" if connection else "")
    got = parse_head(f"GET /a HTTP/{version}\r\n{fields}\r\n".encode())
    assert got is not None and got[0].keep_alive is keep


@pytest.mark.parametrize(("head", "status", "match"), [
    (b"GET /a HTTP/2.0\r\n", 505, "expected HTTP/1.x"),
    (b"GET /a HTTP/1.1 x\r\n", 400, "request line"),
    (b"GET  /a", 400, "request line"),
    (b"G\xc3T", 400, "request line"),
    (b"GET /a HTTQ", 400, "request line"),
    (b"GET /a HTTP/1.1\nHost: x\n\n", 400, "bare LF"),
    (b"GET /a HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"GET /a HTTP/1.1\r\nHost : x\r\n", 400, "Name: value"),
    (b"GET /a HTTP/1.1\r\nHost: x\r\n folded\r\n", 400, "folded"),
    (b"GET /a HTTP/1.1\r\nHost: \x01", 400, "Name: value"),
    (b"GET /a HTTP/1.1\r\nHost: x\x00y\r\n", 400, "control characters"),
    (b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
     "one Content-Length"),
    (b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "one Content-Length"),
    (b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     400, "got both"),
    (b"GET /" + b"a" * (16 << 10), 431, "at most 16384 bytes"),
])
def test_bad_heads_raise_http_error_with_the_status_to_answer(head: bytes, status: int,
                                                              match: str) -> None:
    with pytest.raises(HttpError, match=match) as caught:
        parse_head(head)
    assert caught.value.status == status


def test_repeated_equal_content_lengths_are_one() -> None:
    got = parse_head(b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 7, 7\r\n"
                     b"Content-Length: 7\r\n\r\n")
    assert got is not None and got[0].content_length == 7


@given(st.binary(max_size=400))
def test_garbage_raises_http_error_and_nothing_else(data: bytes) -> None:
    with contextlib.suppress(HttpError):
        parse_head(data, max_head=300)


@given(requests(), st.data())
def test_a_corrupted_head_raises_http_error_or_parses(got: tuple[bytes, Request],
                                                      data: st.DataObject) -> None:
    head = bytearray(got[0])
    head[data.draw(st.integers(0, len(head) - 1))] = data.draw(st.integers(0, 255))
    for cut in (data.draw(st.integers(0, len(head))), len(head)):
        with contextlib.suppress(HttpError):
            parse_head(bytes(head[:cut]))


@given(st.integers(0, 10_000), st.integers(0, 20_000), st.none() | st.integers(0, 20_000))
def test_a_range_stays_inside_the_content(size: int, first: int, last: int | None) -> None:
    value = f"bytes={first}-{'' if last is None else last}"
    try:
        got = parse_range(value, size)
    except HttpError as exc:
        assert exc.status == 416 and first >= size
        assert exc.headers == (("Content-Range", f"bytes */{size}"),)
        return
    if got is None:
        assert last is not None and last < first
        return
    start, end = got
    assert start == first and 0 <= start < end <= size
    assert end == (size if last is None else min(last + 1, size))


@given(st.integers(0, 10_000), st.integers(0, 20_000))
def test_a_suffix_range_is_the_last_bytes(size: int, suffix: int) -> None:
    try:
        got = parse_range(f"bytes=-{suffix}", size)
    except HttpError as exc:
        assert exc.status == 416 and (suffix == 0 or size == 0)
        return
    assert got == (max(0, size - suffix), size)


@pytest.mark.parametrize("value", ["items=0-", "bytes=0-1,3-4", "bytes=x-", "bytes=-",
                                   "bytes=5-2", "bytes 0-"])
def test_ranges_the_server_ignores(value: str) -> None:
    assert parse_range(value, 100) is None


@pytest.mark.parametrize(("target", "name"), [
    ("/a.txt", "a.txt"), ("/a%20b", "a b"), ("/caf%C3%A9?x=1", "café"), ("/..x", None),
    ("/", None), ("/a/b", None), ("/a%2Fb", None), ("/.hidden", None), ("/%FF", None),
    ("*", None), ("/" + "a" * 256, None)])
def test_file_names_are_one_segment_without_a_leading_dot(target: str,
                                                          name: str | None) -> None:
    if name is not None:
        assert file_name(target) == name
        return
    with pytest.raises(HttpError) as caught:
        file_name(target)
    assert caught.value.status in (400, 404)


def test_response_heads() -> None:
    assert httpwire.response_head(206, [("Content-Range", "bytes 0-1/9")]) == \
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/9\r\n\r\n"
    assert httpwire.simple_response(404, b"gone\n", close=True) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\ngone\n")
    assert httpwire.response_head(100) == httpwire.CONTINUE
    for bad in ([("X", "a\r\nb")], [("X Y", "a")], [("X", " a")]):
        with pytest.raises(ValueError, match="expected a header"):
            httpwire.response_head(200, bad)
    with pytest.raises(ValueError, match="expected a status"):
        httpwire.response_head(299)


@given(st.sampled_from(sorted(httpwire.REASONS)), st.lists(st.tuples(tokens, field_values),
                                                            max_size=5))
def test_a_response_head_reads_back_with_the_request_parser_rules(
        status: int, fields: list[tuple[str, str]]) -> None:
    head = httpwire.response_head(status, fields)
    lines = head.split(b"\r\n")
    assert lines[0] == f"HTTP/1.1 {status} {httpwire.REASONS[status]}".encode()
    assert lines[-2:] == [b"", b""] and len(lines) == len(fields) + 3
    assert [httpwire._field(line) for line in lines[1:-2]] == \
        [(n.lower(), v) for n, v in fields]
