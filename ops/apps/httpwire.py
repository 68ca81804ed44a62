"""HTTP/1.1 on the wire for the example file server (ops/apps/fileserver.py): request heads in,
response heads out. Pure: bytes in, values out; the server is the socket shell around it.

    got = parse_head(buf)                    # None until the blank line has arrived
    if got is not None:
        request, length = got                # the head is buf[:length]; the body follows
        request.content_length, request.expect_continue, request.keep_alive
    response_head(200, [("Content-Length", "5")])

A head is the request line and the header lines up to the empty line, CRLF line endings, at
most MAX_HEAD bytes (RFC 9112). Anything else raises HttpError carrying the status a server
answers (400, 431, 501, 505) and a message naming what was expected and what came, as soon as
the bytes seen can no longer start a valid head. Empty lines before the request line are skipped
(RFC 9112 section 2.2) and count in the head's length.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

MAX_HEAD = 16 << 10
MAX_NAME = 255
"""Bytes of a file name (UTF-8), as most file systems allow."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(r"[0-9]{1,19}")
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")
_VERSION_PREFIX = rb"(H(T(T(P(/([0-9](\.[0-9]?)?)?)?)?)?)?)?"
_REQUEST_LINE_PREFIX = re.compile(_TOKEN.pattern + rb"( (" + _TARGET.pattern + rb"( "
                                  + _VERSION_PREFIX + rb")?)?)?")
"""What an incomplete request line may be so far: method, target, version, each cut anywhere."""
_FIELD_PREFIX = re.compile(rb"(" + _TOKEN.pattern + rb"(:" + _FIELD_VALUE.pattern + rb")?)?")
"""What an incomplete header line may be so far."""

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 206: "Partial Content",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 411: "Length Required", 413: "Content Too Large",
    416: "Range Not Satisfiable", 417: "Expectation Failed",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpError(ValueError):
    """A request the server refuses: status is the response it answers with, headers what
    that response carries besides its body's (Content-Range of a 416, Allow of a 405)."""

    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head. Header names are lower-case; values have their surrounding
    blanks removed and are decoded as latin-1 (bytes 0x80-0xff kept one for one)."""

    method: str
    target: str
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The field's value; repeated fields joined with ", " (RFC 9110 section 5.3)."""
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        """A comma-separated field's elements, lower-case (Connection, Expect...)."""
        value = self.header(name)
        return [t.strip().lower() for t in value.split(",") if t.strip()] if value else []

    @property
    def content_length(self) -> int | None:
        """The body's length; None without a Content-Length (parse_head checked its form)."""
        value = self.header("content-length")
        return None if value is None else int(value.split(",")[0])

    @property
    def expect_continue(self) -> bool:
        return "100-continue" in self.tokens("expect")

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the response (HTTP/1.1 unless `close`;
        HTTP/1.0 only with `keep-alive`)."""
        connection = self.tokens("connection")
        if self.version >= (1, 1):
            return "close" not in connection
        return "keep-alive" in connection


def parse_head(buf: bytes | bytearray, max_head: int = MAX_HEAD) -> tuple[Request, int] | None:
    """The request head at the start of buf and its length in bytes; None while incomplete."""
    start = 0
    while buf[start:start + 2] == b"\r\n":
        start += 2
    if start >= max_head:
        raise HttpError(400, f"expected a request line, got {start} bytes of empty lines")
    end = buf.find(b"\r\n\r\n", start, max_head)
    if end < 0:
        _check_partial(buf, start, max_head)
        return None
    lines = bytes(buf[start:end]).split(b"\r\n")
    method, target, version = _request_line(lines[0])
    headers = tuple(_field(line) for line in lines[1:])
    request = Request(method, target, version, headers)
    _check_framing(request)
    return request, end + 4


def _check_partial(buf: bytes | bytearray, start: int, max_head: int) -> None:
    """Raise if the incomplete head in buf can no longer become a valid one."""
    if len(buf) >= max_head:
        raise HttpError(431, f"expected a request head of at most {max_head} bytes ending in "
                        f"an empty line, got {len(buf)} bytes without one")
    seen = bytes(buf[start:])
    if b"\n" in seen.replace(b"\r\n", b""):
        raise HttpError(400, "expected CRLF line endings, got a bare LF")
    *complete, last = seen.split(b"\r\n")
    if complete:
        _request_line(complete[0])
        for line in complete[1:]:
            _field(line)
    last = last[:-1] if last.endswith(b"\r") else last
    if not complete and last and not _REQUEST_LINE_PREFIX.fullmatch(last):
        raise HttpError(400, f"expected a request line 'METHOD TARGET HTTP/1.1', got "
                        f"{last[:80]!r}")
    if complete and not _FIELD_PREFIX.fullmatch(last):
        raise HttpError(400, f"expected a header field 'Name: value', got {last[:80]!r}")


def _request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, f"expected a request line 'METHOD TARGET HTTP/1.1', got "
                        f"{line[:80]!r}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, f"expected a method token, got {method[:40]!r}")
    if not _TARGET.fullmatch(target):
        raise HttpError(400, f"expected a request target of visible ASCII, got {target[:80]!r}")
    got = _VERSION.fullmatch(version)
    if got is None:
        raise HttpError(400, f"expected an HTTP version 'HTTP/1.1', got {version[:20]!r}")
    major, minor = int(got[1]), int(got[2])
    if major != 1:
        raise HttpError(505, f"expected HTTP/1.x, got HTTP/{major}.{minor}")
    return method.decode("ascii"), target.decode("ascii"), (major, minor)


def _field(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, f"expected a header field, got a folded line {line[:40]!r}")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise HttpError(400, f"expected a header field 'Name: value', got {line[:80]!r}")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise HttpError(400, f"expected the value of {name.decode()} without control "
                        f"characters, got {value[:80]!r}")
    return name.decode("ascii").lower(), value.decode("latin-1")


def _check_framing(request: Request) -> None:
    """RFC 9112 section 6: one body length, or none; a Host in HTTP/1.1."""
    if request.version >= (1, 1) and request.header("host") is None:
        raise HttpError(400, "expected a Host header in an HTTP/1.1 request, got none")
    lengths = request.header("content-length")
    if lengths is not None:
        values = {v.strip() for v in lengths.split(",")}
        if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise HttpError(400, f"expected one Content-Length of decimal digits, got "
                            f"{lengths[:80]!r}")
        if request.header("transfer-encoding") is not None:
            raise HttpError(400, "expected Content-Length or Transfer-Encoding, got both")


# ------------------------------------------------------------------ targets and ranges

def file_name(target: str) -> str:
    """The file a target `/<name>` names (percent-decoded, query dropped): one path segment,
    no leading dot, at most MAX_NAME bytes of UTF-8. HttpError 400 or 404 otherwise."""
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise HttpError(400, f"expected a target '/<file name>', got {target[:80]!r}")
    try:
        name = urllib.parse.unquote(path[1:], errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, f"expected a file name in UTF-8, got {path[:80]!r}") from None
    if not name:
        raise HttpError(404, "expected a target '/<file name>', got '/'")
    if "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise HttpError(404, f"expected a file name without '/', a backslash, NUL or a leading "
                        f"dot, got {name[:80]!r}")
    if len(name.encode()) > MAX_NAME:
        raise HttpError(400, f"expected a file name of at most {MAX_NAME} bytes, got "
                        f"{len(name.encode())}")
    return name


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """The byte range [first, end) a Range field asks of a representation of `size` bytes:
    `bytes=N-`, `bytes=N-M` or `bytes=-S` (RFC 9110 section 14). None when the field is to be
    ignored (another unit, several ranges, a malformed one: the whole content is sent);
    HttpError 416 when the range starts at or after the end."""
    got = _RANGE.fullmatch(value.strip())
    if got is None or (not got[1] and not got[2]):
        return None
    if not got[1]:
        suffix = int(got[2])
        if suffix == 0 or size == 0:
            raise HttpError(416, f"expected a suffix range of 1..{size} bytes, got {value!r}",
                            (("Content-Range", f"bytes */{size}"),))
        return max(0, size - suffix), size
    first = int(got[1])
    if got[2] and int(got[2]) < first:
        return None
    if first >= size:
        raise HttpError(416, f"expected a range starting before byte {size}, got {value!r}",
                        (("Content-Range", f"bytes */{size}"),))
    return first, min(int(got[2]) + 1, size) if got[2] else size


# ------------------------------------------------------------------ responses

def response_head(status: int, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """`HTTP/1.1 <status> <reason>`, the fields, and the empty line."""
    reason = REASONS.get(status)
    if reason is None or not 100 <= status <= 599:
        raise ValueError(f"expected a status in {sorted(REASONS)}, got {status}")
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")):
            raise ValueError(f"expected a header name token, got {name!r}")
        raw = value.encode("latin-1")
        if not _FIELD_VALUE.fullmatch(raw) or raw != raw.strip(b" \t"):
            raise ValueError(f"expected a header value without control characters or "
                             f"surrounding blanks, got {value!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def simple_response(status: int, body: bytes = b"", *, close: bool = False,
                    headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole response with a small body (text/plain), Content-Length set."""
    fields = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
              *headers]
    if close:
        fields.append(("Connection", "close"))
    return response_head(status, fields) + body
