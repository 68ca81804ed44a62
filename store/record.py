"""The checkpoint record of one connection: its fields, its wire format and its signature.

Pure: no I/O. The ICI is opaque bytes here (kernel/ owns its codec). All integers are
network byte order, so a record restores on any architecture.

    offset size
    0      4    magic b"TCPC"
    4      1    format version (1)
    5      1    key id length K; 0 means unsigned (refused on read)
    6      K    key id, ASCII
           1+n  origin name (length byte, UTF-8)
           1+n  connection name (length byte, UTF-8)
           8    epoch          (fencing token the writer held)
           8    version        (monotonic per connection)
           8    time_ns        (wall clock when the checkpoint was taken, ns since the epoch)
           8    inbound_consumed   (application's inbound stream position)
           8    outbound_produced  (application's outbound stream position)
           4+n  ICI bytes
           4+n  application state
           4+n  send-queue bytes: empty when the ICI holds the queues (kernel.repair.dump's
                ICIs always do: sent, unsent and received bytes), so no byte is stored twice;
                kept for format 1 and for writers that keep the queue apart from the ICI
           32   HMAC-SHA256 over every byte before it, with key K (absent when K = 0)

The origin and connection names are signed too: a record copied under another origin or
connection is refused as foreign.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from store.errors import (
    InvalidCheckpoint,
    RecordBadSignature,
    RecordCorrupt,
    RecordForeign,
    RecordTooLarge,
    RecordTruncated,
    RecordUnknownKey,
    RecordUnsigned,
    StoreConfigError,
)
from store.keys import check_name
from store.limits import DEFAULT_LIMITS, Limits
from store.signing import MAC_BYTES, KeyRing

MAGIC = b"TCPC"
FORMAT = 1
U64_MAX = 2**64 - 1
_NUMBERS = struct.Struct("!QQQQQ")
_LEN32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One connection's checkpoint, as the checkpointer writes it and the resurrector reads it."""

    origin: str
    conn: str
    epoch: int
    version: int
    time_ns: int
    inbound_consumed: int
    outbound_produced: int
    ici: bytes
    app_state: bytes
    send_queue: bytes

    def __post_init__(self) -> None:
        for name in ("epoch", "version", "time_ns", "inbound_consumed", "outbound_produced"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
                raise InvalidCheckpoint(f"{name} must be an integer in 0..2**64-1, got {value!r}")
        for name in ("ici", "app_state", "send_queue"):
            if not isinstance(getattr(self, name), bytes):
                raise InvalidCheckpoint(
                    f"{name} must be bytes, got {type(getattr(self, name)).__name__}"
                )
        try:
            check_name("origin", self.origin)
            check_name("connection", self.conn, key_safe=False)
        except StoreConfigError as exc:
            raise InvalidCheckpoint(str(exc)) from None


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """What can be read from a record before its signature is checked (for `tcpcp inspect`)."""

    key_id: str
    origin: str
    conn: str
    epoch: int
    version: int
    time_ns: int
    size: int


def _check_sizes(cp: Checkpoint, limits: Limits) -> None:
    for name, limit in (("ici", limits.max_ici), ("app_state", limits.max_app_state),
                        ("send_queue", limits.max_send_queue)):
        size = len(getattr(cp, name))
        if size > limit:
            raise RecordTooLarge(f"{name} must be at most {limit} bytes, got {size}")
    for kind in ("origin", "conn"):
        size = len(getattr(cp, kind).encode("utf-8", errors="surrogatepass"))
        if size > limits.max_name:
            raise RecordTooLarge(f"{kind} name must be at most {limits.max_name} bytes, got {size}")


def encode(cp: Checkpoint, keys: KeyRing, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The signed wire form of `cp`, signed with the key ring's `sign_with` key."""
    _check_sizes(cp, limits)
    key_id = keys.sign_with.encode("ascii")
    origin = cp.origin.encode("utf-8", errors="surrogatepass")
    conn = cp.conn.encode("utf-8", errors="surrogatepass")
    body = b"".join((
        MAGIC, bytes((FORMAT, len(key_id))), key_id,
        bytes((len(origin),)), origin, bytes((len(conn),)), conn,
        _NUMBERS.pack(cp.epoch, cp.version, cp.time_ns, cp.inbound_consumed,
                      cp.outbound_produced),
        _LEN32.pack(len(cp.ici)), cp.ici,
        _LEN32.pack(len(cp.app_state)), cp.app_state,
        _LEN32.pack(len(cp.send_queue)), cp.send_queue,
    ))
    if len(body) + MAC_BYTES > limits.max_record:
        raise RecordTooLarge(
            f"record must be at most {limits.max_record} bytes, got {len(body) + MAC_BYTES}"
        )
    return body + keys.mac(keys.sign_with, body)


class _Reader:
    """Bounds-checked cursor over a record; every short read is RecordTruncated."""

    __slots__ = ("data", "noun", "pos")

    def __init__(self, data: bytes, noun: str = "record") -> None:
        self.data = data
        self.noun = noun
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RecordTruncated(
                f"{self.noun} ends at byte {len(self.data)}, but {what} needs bytes "
                f"{self.pos}..{end}"
            )
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def preamble(self, magic: bytes, fmt: int) -> bytes:
        """The magic, format version and key id (ASCII, empty when unsigned) that start every
        signed store entry; RecordCorrupt naming what was expected."""
        got = self.take(len(magic), "magic")
        if got != magic:
            raise RecordCorrupt(f"{self.noun} must start with {magic!r}, got {got!r}")
        version = self.byte("format version")
        if version != fmt:
            raise RecordCorrupt(f"{self.noun} format must be {fmt}, got {version}")
        raw_key = self.take(self.byte("key id length"), "key id")
        if not raw_key.isascii():
            raise RecordCorrupt(f"key id must be ASCII, got {raw_key!r}")
        return raw_key

    def text(self, what: str) -> str:
        raw = self.take(self.byte(f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordCorrupt(f"{what} must be UTF-8, got {raw!r}") from None

    def blob(self, what: str, limit: int) -> bytes:
        (size,) = _LEN32.unpack(self.take(4, f"{what} length"))
        if size > limit:
            raise RecordTooLarge(f"{what} must be at most {limit} bytes, got {size}")
        return self.take(size, what)


@dataclass(frozen=True, slots=True)
class _Parsed:
    header: RecordHeader
    checkpoint: Checkpoint
    signed_end: int


def _parse(data: bytes, limits: Limits) -> _Parsed:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordCorrupt(f"record must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_record:
        raise RecordTooLarge(f"record must be at most {limits.max_record} bytes, got {len(data)}")
    r = _Reader(data)
    raw_key = r.preamble(MAGIC, FORMAT)
    key_len = len(raw_key)
    origin = r.text("origin name")
    conn = r.text("connection name")
    epoch, version, time_ns, inbound, outbound = _NUMBERS.unpack(r.take(_NUMBERS.size, "numbers"))
    ici = r.blob("ici", limits.max_ici)
    app_state = r.blob("app_state", limits.max_app_state)
    send_queue = r.blob("send_queue", limits.max_send_queue)
    signed_end = r.pos
    if key_len:
        r.take(MAC_BYTES, "signature")
    if r.pos != len(data):
        raise RecordCorrupt(
            f"record must end after its {'signature' if key_len else 'fields'} at byte {r.pos}, "
            f"got {len(data) - r.pos} trailing bytes"
        )
    try:
        cp = Checkpoint(origin=origin, conn=conn, epoch=epoch, version=version, time_ns=time_ns,
                        inbound_consumed=inbound, outbound_produced=outbound, ici=ici,
                        app_state=app_state, send_queue=send_queue)
    except InvalidCheckpoint as exc:
        raise RecordCorrupt(f"record holds an invalid field: {exc}") from None
    header = RecordHeader(key_id=raw_key.decode("ascii"), origin=origin, conn=conn, epoch=epoch,
                          version=version, time_ns=time_ns, size=len(data))
    return _Parsed(header=header, checkpoint=cp, signed_end=signed_end)


def read_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> RecordHeader:
    """The record's header, checking the structure but NOT the signature: display only."""
    return _parse(data, limits).header


def decode(
    data: bytes,
    keys: KeyRing,
    *,
    origin: str | None = None,
    conn: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Checkpoint:
    """The checkpoint in `data`, after checking structure, limits, signature and identity.

    `origin` and `conn`, when given, are where the record was stored: a record signed for
    another origin or connection is refused. Every refusal is a RecordError subclass.
    """
    parsed = _parse(data, limits)
    key_id = parsed.header.key_id
    if not key_id:
        raise RecordUnsigned("record must be signed (key id and HMAC-SHA256), got an unsigned one")
    if not keys.accepts(key_id):
        raise RecordUnknownKey(
            f"record must be signed with one of the keys {sorted(keys.keys)}, got key id {key_id!r}"
        )
    expected = keys.mac(key_id, bytes(data[:parsed.signed_end]))
    if not hmac.compare_digest(expected, bytes(data[parsed.signed_end:])):
        raise RecordBadSignature(
            f"record signature must match its contents under key {key_id!r}: it does not "
            "(forged, corrupted or signed with another secret)"
        )
    cp = parsed.checkpoint
    if origin is not None and cp.origin != origin:
        raise RecordForeign(f"record stored under origin {origin!r} is signed for {cp.origin!r}")
    if conn is not None and cp.conn != conn:
        raise RecordForeign(f"record stored as connection {conn!r} is signed for {cp.conn!r}")
    return cp
