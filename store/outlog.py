"""One entry of a connection's output log: a signed range of its outbound bytes (pure, no I/O).

Logged output (DESIGN.md section 5): the application's outbound bytes are appended to the log
before the kernel gets them, and trimmed once the peer acknowledged them, so the peer is never
ahead of the store. Each append is one entry, in network byte order:

    offset size
    0      4    magic b"TCPO"
    4      1    format version (1)
    5      1    key id length K; 0 means unsigned (refused on read)
    6      K    key id, ASCII
           1+n  origin name (length byte, UTF-8)
           1+n  connection name (length byte, UTF-8)
           8    epoch   (fencing token the writer held)
           8    offset  (outbound stream offset of the first byte)
           4+n  the bytes
           32   HMAC-SHA256 over every byte before it, with key K (absent when K = 0)

Origin, connection and offset are signed: an entry copied to another connection or origin, or
replayed at another offset of the stream, is refused as foreign.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from store.errors import (
    InvalidCheckpoint,
    OutputTooLarge,
    RecordBadSignature,
    RecordCorrupt,
    RecordForeign,
    RecordTooLarge,
    RecordUnknownKey,
    RecordUnsigned,
    StoreConfigError,
)
from store.keys import check_name
from store.limits import DEFAULT_LIMITS, Limits
from store.record import U64_MAX, _Reader
from store.signing import MAC_BYTES, KeyRing

MAGIC = b"TCPO"
FORMAT = 1
_NUMBERS = struct.Struct("!QQ")
_LEN32 = struct.Struct("!I")
NOUN = "output entry"


@dataclass(frozen=True, slots=True)
class OutputRange:
    """Outbound bytes [offset, offset + len(data)) of one connection, as written by `epoch`."""

    origin: str
    conn: str
    epoch: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        for name in ("epoch", "offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
                raise InvalidCheckpoint(f"{name} must be an integer in 0..2**64-1, got {value!r}")
        if not isinstance(self.data, bytes):
            raise InvalidCheckpoint(f"data must be bytes, got {type(self.data).__name__}")
        if self.end > U64_MAX:
            raise InvalidCheckpoint(
                f"output range must end at most at 2**64-1, got offset {self.offset} + "
                f"{len(self.data)} bytes")
        try:
            check_name("origin", self.origin)
            check_name("connection", self.conn, key_safe=False)
        except StoreConfigError as exc:
            raise InvalidCheckpoint(str(exc)) from None

    @property
    def end(self) -> int:
        """The offset just past the range: where the next append starts."""
        return self.offset + len(self.data)


def check_append_size(size: int, limits: Limits) -> None:
    if size > limits.max_output_append:
        raise OutputTooLarge(
            f"an output log append must be at most max_output_append = "
            f"{limits.max_output_append} bytes, got {size}",
            limit="max_output_append", size=size, maximum=limits.max_output_append)


def encode_output(r: OutputRange, keys: KeyRing, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The signed entry of `r`, signed with the key ring's `sign_with` key.

    Raises OutputTooLarge above max_output_append (nothing is sent to the store then).
    """
    check_append_size(len(r.data), limits)
    key_id = keys.sign_with.encode("ascii")
    origin = r.origin.encode("utf-8", errors="surrogatepass")
    conn = r.conn.encode("utf-8", errors="surrogatepass")
    for kind, name in (("origin", origin), ("conn", conn)):
        if len(name) > limits.max_name:
            raise InvalidCheckpoint(
                f"{kind} name must be at most {limits.max_name} bytes, got {len(name)}")
    body = b"".join((
        MAGIC, bytes((FORMAT, len(key_id))), key_id,
        bytes((len(origin),)), origin, bytes((len(conn),)), conn,
        _NUMBERS.pack(r.epoch, r.offset), _LEN32.pack(len(r.data)), r.data,
    ))
    return body + keys.mac(keys.sign_with, body)


def decode_output(data: bytes, keys: KeyRing, *, origin: str, conn: str, offset: int,
                  limits: Limits = DEFAULT_LIMITS) -> OutputRange:
    """The range in entry `data`, stored at `offset` of `origin`/`conn`'s log, once its
    structure, limits, signature and identity are checked. Every refusal is a RecordError:
    RecordForeign for an entry signed for another origin, connection or offset."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordCorrupt(f"{NOUN} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    r = _Reader(data, NOUN)
    raw_key = r.preamble(MAGIC, FORMAT)
    key_len = len(raw_key)
    signed_origin = r.text("origin name")
    signed_conn = r.text("connection name")
    epoch, signed_offset = _NUMBERS.unpack(r.take(_NUMBERS.size, "numbers"))
    (size,) = _LEN32.unpack(r.take(4, "data length"))
    if size > limits.max_output_append:
        raise RecordTooLarge(
            f"{NOUN} data must be at most max_output_append = {limits.max_output_append} "
            f"bytes, got {size}")
    payload = r.take(size, "data")
    signed_end = r.pos
    if key_len:
        r.take(MAC_BYTES, "signature")
    if r.pos != len(data):
        raise RecordCorrupt(
            f"{NOUN} must end after its {'signature' if key_len else 'fields'} at byte {r.pos}, "
            f"got {len(data) - r.pos} trailing bytes")
    key_id = raw_key.decode("ascii")
    if not key_id:
        raise RecordUnsigned(f"{NOUN} must be signed (key id and HMAC-SHA256), got an unsigned one")
    if not keys.accepts(key_id):
        raise RecordUnknownKey(
            f"{NOUN} must be signed with one of the keys {sorted(keys.keys)}, "
            f"got key id {key_id!r}")
    if not hmac.compare_digest(keys.mac(key_id, data[:signed_end]), data[signed_end:]):
        raise RecordBadSignature(
            f"{NOUN} signature must match its contents under key {key_id!r}: it does not "
            "(forged, corrupted or signed with another secret)")
    if signed_origin != origin:
        raise RecordForeign(f"{NOUN} stored under origin {origin!r} is signed for "
                            f"{signed_origin!r}")
    if signed_conn != conn:
        raise RecordForeign(f"{NOUN} stored as connection {conn!r} is signed for "
                            f"{signed_conn!r}")
    if signed_offset != offset:
        raise RecordForeign(f"{NOUN} stored at offset {offset} of {origin}/{conn} is signed "
                            f"for offset {signed_offset}")
    try:
        return OutputRange(origin=signed_origin, conn=signed_conn, epoch=epoch,
                           offset=signed_offset, data=payload)
    except InvalidCheckpoint as exc:
        raise RecordCorrupt(f"{NOUN} holds an invalid field: {exc}") from None
