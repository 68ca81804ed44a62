"""The checkpointer's local API: the frames an application (the library) and the agent exchange
on the agent's unix socket. Pure: bytes in, values out; checkpointer/fdpass.py moves the frames
and the descriptors that travel with them (SCM_RIGHTS).

One client conversation:

    library                                          agent
    HELLO (versions it speaks, its name)        ─►   negotiate()
            ◄─  HELLO_OK (version chosen, the agent's limits)  or ERROR UNSUPPORTED_VERSION
    REGISTER_CONNECTION + 1 descriptor          ─►   check the socket, guard it
            ◄─  REGISTERED (connection id issued by the agent)
    REGISTER_LISTENER + 1 descriptor            ─►        ◄─  REGISTERED (id)
    COMMIT (id, state, consumed, produced, ...) ─►        ◄─  COMMITTED (id, consumed, produced)
    END_OF_STREAM (id, direction, position)     ─►        ◄─  DONE (id)
    CLOSE (id)                                  ─►        ◄─  DONE (id)

Any request may instead be answered with ERROR (a stable code from ErrorCode and a message that
names what was expected and what came). Every request carries a request id chosen by the client,
echoed in its reply, so a client may have several requests in flight.

Every frame is

    header  magic "TCPA" | version u8 | kind u8 | flags u16 (0) | request id u32 | length u32
    body    `length` bytes, kind-specific (below); integers in network byte order

HELLO, HELLO_OK, and an ERROR answering a frame that came before negotiation carry version 0 in
the header: their layout is frozen across versions. Every other frame carries the negotiated
version. The header's length is checked against the kind's largest possible body (bounded by
Limits) before the body is read, so a sender cannot make the reader buffer more than that.

Bodies (positions are stream byte counts, u64; ids u64, issued by the agent, never 0):
    HELLO                n u8 (1..MAX_VERSIONS) | version u8 * n | client name u8 len + UTF-8
    REGISTER_CONNECTION  consumed u64 | produced u64 | contract u8 | state u32 len + bytes
                         (the connected TCP socket travels alongside)
    REGISTER_LISTENER    contract u8 (for the connections it accepts; the listening socket
                         travels alongside)
    COMMIT               id u64 | consumed u64 | produced u64 | flags u8 (1: end of stream,
                         2: outbound present) | state u32 len + bytes |
                         [outbound u32 len + bytes: the logged contract's bytes that end at
                         `produced`, i.e. stream positions produced - len .. produced]
    END_OF_STREAM        id u64 | direction u8 (1 inbound: the peer's FIN was read at
                         `position` = consumed; 2 outbound: the application shut down writing
                         at `position` = produced) | position u64
    CLOSE                id u64
    HELLO_OK             version u8 | max_frame u32 | max_state u32 | max_outbound u32 |
                         max_connections u32
    REGISTERED, DONE     id u64
    COMMITTED            id u64 | consumed u64 | produced u64
    ERROR                code u16 | message u16 len (<= MAX_MESSAGE) + UTF-8

Anything else raises ApiError with the code saying which rule and the message naming the field.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

MAGIC = b"TCPA"
VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
"""Versions this module speaks, oldest first."""
HELLO_VERSION = 0
"""Header version of the frames whose layout never changes (HELLO, HELLO_OK, early ERROR)."""
MAX_VERSIONS = 16
MAX_NAME = 255
MAX_MESSAGE = 1000
MAX_ID = (1 << 64) - 1
MAX_POSITION = (1 << 64) - 1
HEADER = struct.Struct("!4sBBHII")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_REGISTER = struct.Struct("!QQB")
_COMMIT = struct.Struct("!QQQB")
_EOS = struct.Struct("!QBQ")
_LIMITS = struct.Struct("!BIIII")
_COMMITTED = struct.Struct("!QQQ")
_FLAG_EOS = 1
_FLAG_OUTBOUND = 2


class ErrorCode(enum.IntEnum):
    """Why a request was refused. The values are part of the protocol: never renumber."""

    MALFORMED = 1            # a field does not parse (truncated, bad magic, bad enum, trailing)
    TOO_LARGE = 2            # a frame, blob or count beyond the limits
    UNSUPPORTED_VERSION = 3  # no version in common, or a frame of another version
    NOT_NEGOTIATED = 4       # a request before HELLO
    UNKNOWN_KIND = 5         # a frame kind this side does not know or does not expect
    UNKNOWN_CONNECTION = 6   # an id the agent did not issue to this client (or closed)
    TOO_MANY_CONNECTIONS = 7
    NOT_AUTHORISED = 8       # SO_PEERCRED uid/gid not allowed
    DEADLINE = 9             # a frame did not arrive (or leave) in time
    DISCONNECTED = 10        # the other side closed in the middle of a frame
    DESCRIPTORS = 11         # missing descriptors, or more than the control buffer holds
    NOT_A_SOCKET = 12
    NOT_INET = 13            # a socket of another family than AF_INET/AF_INET6
    NOT_TCP = 14             # an inet socket that is not TCP (UDP, raw, SCTP, MPTCP ...)
    BAD_STATE = 15           # a TCP socket in a state the request cannot use
    NOT_GUARDED = 16         # a local address:port the agent does not guard
    BAD_POSITION = 17        # positions going back, or outbound longer than what was produced
    WRONG_CONTRACT = 18      # outbound bytes for a regenerable connection, or none when logged
    UNAVAILABLE = 19         # the agent cannot commit now (store unreachable, host fenced)
    INTERNAL = 20            # the agent failed; the message says where


class ApiError(ValueError):
    """A frame or request that does not fit. code: which rule; request_id: the id of the frame
    it concerns when the header was readable (so the answer can echo it), else None."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Kind(enum.IntEnum):
    HELLO = 1
    REGISTER_CONNECTION = 2
    REGISTER_LISTENER = 3
    COMMIT = 4
    END_OF_STREAM = 5
    CLOSE = 6
    HELLO_OK = 0x81
    REGISTERED = 0x82
    COMMITTED = 0x83
    DONE = 0x84
    ERROR = 0x85


REQUESTS = frozenset({Kind.HELLO, Kind.REGISTER_CONNECTION, Kind.REGISTER_LISTENER, Kind.COMMIT,
                      Kind.END_OF_STREAM, Kind.CLOSE})
REPLIES = frozenset({Kind.HELLO_OK, Kind.REGISTERED, Kind.COMMITTED, Kind.DONE, Kind.ERROR})
_UNVERSIONED = frozenset({Kind.HELLO, Kind.HELLO_OK, Kind.ERROR})
DESCRIPTORS = {Kind.REGISTER_CONNECTION: 1, Kind.REGISTER_LISTENER: 1}
"""How many descriptors travel with a frame of each kind (0 when not listed)."""


def descriptors_for(kind: Kind) -> int:
    """The number of descriptors a frame of this kind carries."""
    return DESCRIPTORS.get(kind, 0)


class Contract(enum.IntEnum):
    """DESIGN.md section 5: how bytes written after the last checkpoint are recovered."""

    REGENERABLE = 1  # the state maps stream positions to content
    LOGGED = 2       # outbound bytes are checkpointed (COMMIT.outbound) before the kernel has them


class Direction(enum.IntEnum):
    INBOUND = 1   # the peer's FIN was read: position is the consumed count before it
    OUTBOUND = 2  # the application shut down writing: position is the produced count


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one side accepts. The agent's travel to the client in HELLO_OK.

    max_frame: a whole frame, header included; max_state: one application state blob;
    max_outbound: logged outbound bytes in one COMMIT; max_connections: connections and
    listeners one client may have registered at once (enforced by the agent)."""

    max_frame: int = 1 << 20
    max_state: int = 256 << 10
    max_outbound: int = 512 << 10
    max_connections: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_state", "max_outbound", "max_connections"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value < 1 << 32:
                raise ApiError(ErrorCode.MALFORMED, f"limit {name}: expected an integer "
                               f"1..{(1 << 32) - 1}, got {value!r}")
        need = HEADER.size + _COMMIT.size + 8 + self.max_state + self.max_outbound
        if self.max_frame < need:
            raise ApiError(ErrorCode.MALFORMED, f"limit max_frame: expected at least {need} "
                           f"bytes (a COMMIT with max_state {self.max_state} and max_outbound "
                           f"{self.max_outbound}), got {self.max_frame}")


# ------------------------------------------------------------------ values

def _check_int(value: object, what: str, top: int, low: int = 0) -> None:
    if type(value) is not int or not low <= value <= top:
        raise ApiError(ErrorCode.MALFORMED, f"{what}: expected an integer {low}..{top}, "
                       f"got {value!r}")


def _check_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes):
        raise ApiError(ErrorCode.MALFORMED, f"{what}: expected bytes, got "
                       f"{type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Hello:
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    client: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.versions, tuple) or not 0 < len(self.versions) <= MAX_VERSIONS:
            raise ApiError(ErrorCode.MALFORMED, f"HELLO versions: expected 1..{MAX_VERSIONS} "
                           f"versions, got {self.versions!r}")
        for v in self.versions:
            _check_int(v, "HELLO version", 255, 1)
        if not isinstance(self.client, str) or len(self.client.encode()) > MAX_NAME:
            raise ApiError(ErrorCode.MALFORMED, f"HELLO client: expected at most {MAX_NAME} "
                           f"bytes of UTF-8, got {self.client!r:.80}")


@dataclass(frozen=True, slots=True)
class RegisterConnection:
    consumed: int
    produced: int
    contract: Contract
    state: bytes = b""

    def __post_init__(self) -> None:
        _check_int(self.consumed, "REGISTER_CONNECTION consumed", MAX_POSITION)
        _check_int(self.produced, "REGISTER_CONNECTION produced", MAX_POSITION)
        if not isinstance(self.contract, Contract):
            raise ApiError(ErrorCode.MALFORMED, f"REGISTER_CONNECTION contract: expected a "
                           f"Contract, got {self.contract!r}")
        _check_bytes(self.state, "REGISTER_CONNECTION state")


@dataclass(frozen=True, slots=True)
class RegisterListener:
    contract: Contract

    def __post_init__(self) -> None:
        if not isinstance(self.contract, Contract):
            raise ApiError(ErrorCode.MALFORMED, f"REGISTER_LISTENER contract: expected a "
                           f"Contract, got {self.contract!r}")


@dataclass(frozen=True, slots=True)
class Commit:
    conn_id: int
    state: bytes
    consumed: int
    produced: int
    end_of_stream: bool = False
    outbound: bytes | None = None

    def __post_init__(self) -> None:
        _check_int(self.conn_id, "COMMIT id", MAX_ID, 1)
        _check_bytes(self.state, "COMMIT state")
        _check_int(self.consumed, "COMMIT consumed", MAX_POSITION)
        _check_int(self.produced, "COMMIT produced", MAX_POSITION)
        if not isinstance(self.end_of_stream, bool):
            raise ApiError(ErrorCode.MALFORMED, f"COMMIT end_of_stream: expected a bool, got "
                           f"{self.end_of_stream!r}")
        if self.outbound is not None:
            _check_bytes(self.outbound, "COMMIT outbound")
            if len(self.outbound) > self.produced:
                raise ApiError(ErrorCode.BAD_POSITION, f"COMMIT outbound: expected at most "
                               f"produced ({self.produced}) bytes, got {len(self.outbound)}")


@dataclass(frozen=True, slots=True)
class EndOfStream:
    conn_id: int
    direction: Direction
    position: int

    def __post_init__(self) -> None:
        _check_int(self.conn_id, "END_OF_STREAM id", MAX_ID, 1)
        if not isinstance(self.direction, Direction):
            raise ApiError(ErrorCode.MALFORMED, f"END_OF_STREAM direction: expected a "
                           f"Direction, got {self.direction!r}")
        _check_int(self.position, "END_OF_STREAM position", MAX_POSITION)


@dataclass(frozen=True, slots=True)
class Close:
    conn_id: int

    def __post_init__(self) -> None:
        _check_int(self.conn_id, "CLOSE id", MAX_ID, 1)


@dataclass(frozen=True, slots=True)
class HelloOk:
    version: int
    limits: Limits

    def __post_init__(self) -> None:
        _check_int(self.version, "HELLO_OK version", 255, 1)


@dataclass(frozen=True, slots=True)
class Registered:
    conn_id: int

    def __post_init__(self) -> None:
        _check_int(self.conn_id, "REGISTERED id", MAX_ID, 1)


@dataclass(frozen=True, slots=True)
class Committed:
    conn_id: int
    consumed: int
    produced: int

    def __post_init__(self) -> None:
        _check_int(self.conn_id, "COMMITTED id", MAX_ID, 1)
        _check_int(self.consumed, "COMMITTED consumed", MAX_POSITION)
        _check_int(self.produced, "COMMITTED produced", MAX_POSITION)


@dataclass(frozen=True, slots=True)
class Done:
    conn_id: int

    def __post_init__(self) -> None:
        _check_int(self.conn_id, "DONE id", MAX_ID, 1)


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            raise ApiError(ErrorCode.MALFORMED, f"ERROR code: expected an ErrorCode, got "
                           f"{self.code!r}")
        if not isinstance(self.message, str):
            raise ApiError(ErrorCode.MALFORMED, f"ERROR message: expected a str, got "
                           f"{type(self.message).__name__}")

    @classmethod
    def of(cls, exc: ApiError) -> Error:
        """The reply that reports exc (its message cut to MAX_MESSAGE bytes of UTF-8)."""
        return cls(exc.code, _cut(exc.message))

    def exception(self, request_id: int | None = None) -> ApiError:
        """The ApiError this reply reports, for a client to raise."""
        return ApiError(self.code, self.message, request_id)


Request = Hello | RegisterConnection | RegisterListener | Commit | EndOfStream | Close
Reply = HelloOk | Registered | Committed | Done | Error
_KIND_OF: dict[type, Kind] = {
    Hello: Kind.HELLO, RegisterConnection: Kind.REGISTER_CONNECTION,
    RegisterListener: Kind.REGISTER_LISTENER, Commit: Kind.COMMIT,
    EndOfStream: Kind.END_OF_STREAM, Close: Kind.CLOSE, HelloOk: Kind.HELLO_OK,
    Registered: Kind.REGISTERED, Committed: Kind.COMMITTED, Done: Kind.DONE, Error: Kind.ERROR,
}


def kind_of(message: Request | Reply) -> Kind:
    return _KIND_OF[type(message)]


def negotiate(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int:
    """The highest version both sides speak; UNSUPPORTED_VERSION naming both lists otherwise."""
    theirs, ours = sorted(set(offered)), sorted(set(supported))
    common = set(theirs) & set(ours)
    if not common:
        raise ApiError(ErrorCode.UNSUPPORTED_VERSION,
                       f"expected one of versions {', '.join(map(str, ours))}, got "
                       f"{', '.join(map(str, theirs)) or 'none'}")
    return max(common)


def _cut(text: str) -> str:
    raw = text.encode()
    return text if len(raw) <= MAX_MESSAGE else raw[:MAX_MESSAGE].decode(errors="ignore")


# ------------------------------------------------------------------ bounds

def max_body(kind: Kind, limits: Limits) -> int:
    """The largest body a frame of this kind may announce under these limits."""
    if kind is Kind.HELLO:
        return 1 + MAX_VERSIONS + 1 + MAX_NAME
    if kind is Kind.REGISTER_CONNECTION:
        return _REGISTER.size + 4 + limits.max_state
    if kind is Kind.REGISTER_LISTENER:
        return 1
    if kind is Kind.COMMIT:
        return _COMMIT.size + 4 + limits.max_state + 4 + limits.max_outbound
    if kind is Kind.END_OF_STREAM:
        return _EOS.size
    if kind is Kind.HELLO_OK:
        return _LIMITS.size
    if kind is Kind.COMMITTED:
        return _COMMITTED.size
    if kind is Kind.ERROR:
        return 4 + MAX_MESSAGE
    return 8  # CLOSE, REGISTERED, DONE


def _check_size(what: str, n: int, cap: int, field: str) -> None:
    if n > cap:
        raise ApiError(ErrorCode.TOO_LARGE, f"{what}: {field} of at most {cap} bytes expected, "
                       f"got {n}")


# ------------------------------------------------------------------ encoding

def _blob(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _body(message: Request | Reply, limits: Limits) -> bytes:
    what = kind_of(message).name
    if isinstance(message, Hello):
        name = message.client.encode()
        return (_U8.pack(len(message.versions)) + bytes(message.versions)
                + _U8.pack(len(name)) + name)
    if isinstance(message, RegisterConnection):
        _check_size(what, len(message.state), limits.max_state, "state")
        return (_REGISTER.pack(message.consumed, message.produced, message.contract)
                + _blob(message.state))
    if isinstance(message, RegisterListener):
        return _U8.pack(message.contract)
    if isinstance(message, Commit):
        _check_size(what, len(message.state), limits.max_state, "state")
        flags = _FLAG_EOS if message.end_of_stream else 0
        tail = b""
        if message.outbound is not None:
            _check_size(what, len(message.outbound), limits.max_outbound, "outbound")
            flags |= _FLAG_OUTBOUND
            tail = _blob(message.outbound)
        return (_COMMIT.pack(message.conn_id, message.consumed, message.produced, flags)
                + _blob(message.state) + tail)
    if isinstance(message, EndOfStream):
        return _EOS.pack(message.conn_id, message.direction, message.position)
    if isinstance(message, Close | Registered | Done):
        return _U64.pack(message.conn_id)
    if isinstance(message, HelloOk):
        lim = message.limits
        return _LIMITS.pack(message.version, lim.max_frame, lim.max_state, lim.max_outbound,
                            lim.max_connections)
    if isinstance(message, Committed):
        return _COMMITTED.pack(message.conn_id, message.consumed, message.produced)
    raw = _cut(message.message).encode()
    return _U16.pack(message.code) + _U16.pack(len(raw)) + raw


def encode(message: Request | Reply, request_id: int, version: int = VERSION,
           limits: Limits | None = None) -> bytes:
    """The bytes of one frame. version: the negotiated one (ignored for HELLO and HELLO_OK,
    which always carry HELLO_VERSION; pass HELLO_VERSION for an ERROR sent before
    negotiation). limits: the receiver's, refused here with TOO_LARGE rather than there."""
    _check_int(request_id, "request id", (1 << 32) - 1)
    _check_int(version, "version", 255)
    kind = kind_of(message)
    if kind in (Kind.HELLO, Kind.HELLO_OK):
        version = HELLO_VERSION
    elif version == HELLO_VERSION and kind is not Kind.ERROR:
        raise ApiError(ErrorCode.NOT_NEGOTIATED, f"{kind.name}: expected a negotiated version "
                       f"(>= 1), got {version}")
    lim = limits or Limits()
    body = _body(message, lim)
    _check_size(kind.name, HEADER.size + len(body), lim.max_frame, "frame")
    return HEADER.pack(MAGIC, version, kind, 0, request_id, len(body)) + body


# ------------------------------------------------------------------ decoding

@dataclass(frozen=True, slots=True)
class Header:
    version: int
    kind: Kind
    request_id: int
    length: int


def read_header(head: bytes, limits: Limits, *, version: int | None,
                expect: frozenset[Kind] = REQUESTS) -> Header:
    """The fixed header of a frame, checked before its body is read: magic, version (version:
    the one negotiated, None before HELLO), a kind in expect, and a length within what that
    kind may carry under limits. Raises ApiError (with request_id once it is known)."""
    if len(head) != HEADER.size:
        raise ApiError(ErrorCode.MALFORMED, f"frame header: expected {HEADER.size} bytes, got "
                       f"{len(head)}")
    magic, ver, kind, flags, request_id, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise ApiError(ErrorCode.MALFORMED, f"frame header: expected magic {MAGIC!r}, got "
                       f"{magic!r}")

    def fail(code: ErrorCode, message: str) -> ApiError:
        return ApiError(code, message, request_id)

    wanted = "/".join(k.name for k in sorted(expect))
    if kind not in Kind._value2member_map_ or Kind(kind) not in expect:
        got = Kind(kind).name if kind in Kind._value2member_map_ else f"kind {kind}"
        raise fail(ErrorCode.UNKNOWN_KIND, f"frame: expected one of {wanted}, got {got}")
    k = Kind(kind)
    if ver == HELLO_VERSION:
        if k not in _UNVERSIONED:
            raise fail(ErrorCode.NOT_NEGOTIATED, f"{k.name} frame of version 0: expected "
                       "HELLO first (only HELLO, HELLO_OK and ERROR carry version 0)")
    elif k in (Kind.HELLO, Kind.HELLO_OK):
        raise fail(ErrorCode.UNSUPPORTED_VERSION, f"{k.name} frame: expected header version "
                   f"0, got {ver}")
    elif version is None:
        raise fail(ErrorCode.NOT_NEGOTIATED, f"{k.name} frame: expected HELLO first, got "
                   f"version {ver} before any was negotiated")
    elif ver != version:
        raise fail(ErrorCode.UNSUPPORTED_VERSION, f"{k.name} frame: expected version "
                   f"{version} (negotiated), got {ver}")
    if flags:
        raise fail(ErrorCode.MALFORMED, f"{k.name} frame header: flags must be 0, got "
                   f"{flags:#x}")
    cap = min(max_body(k, limits), limits.max_frame - HEADER.size)
    if length > cap:
        raise fail(ErrorCode.TOO_LARGE, f"{k.name} frame: body of at most {cap} bytes "
                   f"expected, announced {length}")
    return Header(ver, k, request_id, length)


class _Reader:
    def __init__(self, data: bytes, what: str, request_id: int) -> None:
        self.data, self.pos, self.what, self.request_id = data, 0, what, request_id

    def fail(self, code: ErrorCode, message: str) -> ApiError:
        return ApiError(code, f"{self.what}: {message}", self.request_id)

    def take(self, n: int, field: str) -> bytes:
        if len(self.data) - self.pos < n:
            raise self.fail(ErrorCode.MALFORMED, f"{field} truncated (expected {n} bytes, got "
                            f"{len(self.data) - self.pos})")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size, field))

    def blob(self, field: str, cap: int) -> bytes:
        (n,) = self.unpack(_U32, f"{field} length")
        if n > cap:  # before anything is taken
            raise self.fail(ErrorCode.TOO_LARGE, f"{field} of at most {cap} bytes expected, "
                            f"got {n}")
        return self.take(n, field)

    def text(self, n: int, field: str) -> str:
        raw = self.take(n, field)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise self.fail(ErrorCode.MALFORMED, f"{field}: expected UTF-8, got "
                            f"{raw[:40]!r}") from None

    def enum(self, cls: type[enum.IntEnum], value: int, field: str) -> enum.IntEnum:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(f"{m.value} ({m.name})" for m in cls)
            raise self.fail(ErrorCode.MALFORMED, f"{field}: expected one of {names}, got "
                            f"{value}") from None

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(ErrorCode.MALFORMED, f"expected the end of the body, got "
                            f"{len(self.data) - self.pos} more bytes")


def _decode(header: Header, body: bytes, limits: Limits) -> Request | Reply:
    k = header.kind
    r = _Reader(body, f"{k.name} frame", header.request_id)
    if len(body) != header.length:
        raise r.fail(ErrorCode.MALFORMED, f"body of {header.length} bytes expected (header), "
                     f"got {len(body)}")
    try:
        out = _fields(k, r, limits)
    except ApiError as exc:
        exc.request_id = header.request_id
        raise
    r.done()
    return out


def _fields(k: Kind, r: _Reader, limits: Limits) -> Request | Reply:
    if k is Kind.HELLO:
        (n,) = r.unpack(_U8, "version count")
        if not 0 < n <= MAX_VERSIONS:
            raise r.fail(ErrorCode.MALFORMED, f"version count: expected 1..{MAX_VERSIONS}, "
                         f"got {n}")
        versions = tuple(r.take(n, "versions"))
        if 0 in versions:
            raise r.fail(ErrorCode.MALFORMED, f"versions: expected 1..255 each, got "
                         f"{list(versions)}")
        (n,) = r.unpack(_U8, "client name length")
        return Hello(versions, r.text(n, "client name"))
    if k is Kind.REGISTER_CONNECTION:
        consumed, produced, contract = r.unpack(_REGISTER, "positions")
        c = r.enum(Contract, contract, "contract")
        return RegisterConnection(consumed, produced, Contract(c),
                                  r.blob("state", limits.max_state))
    if k is Kind.REGISTER_LISTENER:
        (contract,) = r.unpack(_U8, "contract")
        return RegisterListener(Contract(r.enum(Contract, contract, "contract")))
    if k is Kind.COMMIT:
        conn_id, consumed, produced, flags = r.unpack(_COMMIT, "id and positions")
        if flags & ~(_FLAG_EOS | _FLAG_OUTBOUND):
            raise r.fail(ErrorCode.MALFORMED, f"flags: expected bits 1 (end of stream) and 2 "
                         f"(outbound) only, got {flags:#x}")
        state = r.blob("state", limits.max_state)
        outbound = r.blob("outbound", limits.max_outbound) if flags & _FLAG_OUTBOUND else None
        return Commit(_id(r, conn_id), state, consumed, produced, bool(flags & _FLAG_EOS),
                      outbound)
    if k is Kind.END_OF_STREAM:
        conn_id, direction, position = r.unpack(_EOS, "fields")
        return EndOfStream(_id(r, conn_id), Direction(r.enum(Direction, direction,
                                                             "direction")), position)
    if k in (Kind.CLOSE, Kind.REGISTERED, Kind.DONE):
        (conn_id,) = r.unpack(_U64, "id")
        ident = _id(r, conn_id)
        return Close(ident) if k is Kind.CLOSE else (
            Registered(ident) if k is Kind.REGISTERED else Done(ident))
    if k is Kind.HELLO_OK:
        version, *caps = r.unpack(_LIMITS, "version and limits")
        if version == 0:
            raise r.fail(ErrorCode.MALFORMED, "version: expected 1..255, got 0")
        return HelloOk(version, Limits(*caps))
    if k is Kind.COMMITTED:
        conn_id, consumed, produced = r.unpack(_COMMITTED, "id and positions")
        return Committed(_id(r, conn_id), consumed, produced)
    (code,) = r.unpack(_U16, "error code")
    c = ErrorCode(r.enum(ErrorCode, code, "error code"))
    (n,) = r.unpack(_U16, "message length")
    if n > MAX_MESSAGE:
        raise r.fail(ErrorCode.TOO_LARGE, f"message of at most {MAX_MESSAGE} bytes expected, "
                     f"got {n}")
    return Error(c, r.text(n, "message"))


def _id(r: _Reader, conn_id: int) -> int:
    if conn_id == 0:
        raise r.fail(ErrorCode.MALFORMED, f"id: expected 1..{MAX_ID}, got 0")
    return conn_id


def decode_request(header: Header, body: bytes, limits: Limits) -> Request:
    """The request in body (header from read_header with expect=REQUESTS)."""
    if header.kind not in REQUESTS:
        raise ApiError(ErrorCode.UNKNOWN_KIND, f"frame: expected a request, got "
                       f"{header.kind.name}", header.request_id)
    return cast(Request, _decode(header, body, limits))


def decode_reply(header: Header, body: bytes, limits: Limits) -> Reply:
    """The reply in body (header from read_header with expect=REPLIES)."""
    if header.kind not in REPLIES:
        raise ApiError(ErrorCode.UNKNOWN_KIND, f"frame: expected a reply, got "
                       f"{header.kind.name}", header.request_id)
    return cast(Reply, _decode(header, body, limits))


def _split(data: bytes, limits: Limits, version: int | None,
           expect: frozenset[Kind]) -> tuple[Header, bytes]:
    header = read_header(data[: HEADER.size], limits, version=version, expect=expect)
    body = data[HEADER.size :]
    if len(body) != header.length:
        raise ApiError(ErrorCode.MALFORMED, f"{header.kind.name} frame: body of "
                       f"{header.length} bytes expected (header), got {len(body)}",
                       header.request_id)
    return header, body


def parse_request(data: bytes, limits: Limits, version: int | None) -> tuple[int, Request]:
    """(request id, request) from the bytes of exactly one frame."""
    header, body = _split(data, limits, version, REQUESTS)
    return header.request_id, decode_request(header, body, limits)


def parse_reply(data: bytes, limits: Limits, version: int | None) -> tuple[int, Reply]:
    """(request id, reply) from the bytes of exactly one frame."""
    header, body = _split(data, limits, version, REPLIES)
    return header.request_id, decode_reply(header, body, limits)
