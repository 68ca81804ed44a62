"""RESP2 for the example key-value server (ops/apps/kvserver.py): the request parser, the reply
encoders, and the command executor over an in-memory key space. Pure: bytes in, bytes out; the
server is the socket shell around it.

    parser = RequestParser()
    parser.feed(data)                        # whatever recv() returned
    for command in parser:                   # complete commands: tuples of bytes
        out += state.execute(command)        # (b"SET", b"k", b"v") -> b"+OK\\r\\n"
    parser.consumed                          # stream bytes of the commands parsed so far
    parser.pending                           # the bytes of an incomplete command, kept

Requests are what redis-cli and redis-benchmark send: arrays of bulk strings
(`*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n`) and inline commands (`GET k\\r\\n`, split on blanks,
quotes and escapes as Redis splits them). The parser is incremental: it keeps its place inside a
command across feeds, so a large command arriving in many reads is scanned once. Everything is
bounded (Limits): arguments per command, bytes per bulk string, bytes per command, bytes per
inline line; anything else raises ProtocolError naming what was expected and what came, as soon
as the bytes seen can no longer start a valid request.

KvState executes the subset of Redis a demo needs (PING ECHO GET SET INCR INCRBY DECR DECRBY DEL
EXISTS DBSIZE) and answers what redis-cli and redis-benchmark send when they start (COMMAND,
CONFIG GET, HELLO, CLIENT, SELECT, INFO, QUIT). Keys never expire: SET's EX/PX/EXAT/PXAT/KEEPTTL
are checked and ignored. Its snapshot is deterministic (keys sorted) and bounded (max_bytes,
max_keys: a write that would pass either is answered with an error and not applied), because it
travels in every checkpoint commit:

    snapshot   magic "TKV1" | generation u64 | count u32 | count * (key u32 len + bytes,
               value u32 len + bytes), keys in ascending byte order; network byte order

generation counts the writes applied since the key space was created, so of several snapshots of
one key space the highest generation is the newest. savepoint()/rollback() undo the writes since
the savepoint (a commit the checkpointer refused); release() keeps them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

Command = tuple[bytes, ...]

CRLF = b"\r\n"
MAX_HEADER_LINE = 32
"""`*<count>\\r\\n` and `$<length>\\r\\n` lines: the longest valid one is 10 bytes."""
_NUMBER = re.compile(rb"0|[1-9][0-9]*")
_NUMBER_PREFIX = re.compile(rb"-?[0-9]*\r?")
_INT64 = re.compile(rb"0|-?[1-9][0-9]{0,18}")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SPACE = frozenset(b" \t\n\r\v\f")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {ord("n"): ord("\n"), ord("r"): ord("\r"), ord("t"): ord("\t"), ord("b"): ord("\b"),
            ord("a"): ord("\a")}


class RespError(ValueError):
    """A RESP request or a key-space snapshot that does not fit."""


class ProtocolError(RespError):
    """Bytes that cannot be (the start of) a request; the message says what was expected."""


class SnapshotError(RespError):
    """A key-space snapshot that cannot be restored; the message names the field."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of one request: arguments, bytes of one bulk string, bytes of one whole command
    (headers included), bytes of one inline line (its newline included)."""

    max_args: int = 1024
    max_bulk: int = 1 << 20
    max_command: int = (1 << 20) + (64 << 10)
    max_inline: int = 64 << 10

    def __post_init__(self) -> None:
        for name in ("max_args", "max_bulk", "max_command", "max_inline"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"limit {name}: expected a positive integer, got {value!r}")


# ------------------------------------------------------------------ requests

class RequestParser:
    """Commands out of a request stream fed in pieces. Iterating yields the complete commands
    buffered so far and stops at an incomplete one; it raises ProtocolError at garbage (the
    commands before it have been yielded, and `consumed` stops at the garbage's start)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.consumed = 0
        """Stream bytes of the commands parsed (empty ones skipped) since the start."""
        self._buf = bytearray()
        self._pos = 0       # _buf index of the current command's next unparsed byte
        self._start = 0     # _buf index where the current command starts
        self._argc = -1     # bulk strings still to read in the current array; -1: between
        self._bulk = -1     # length of the bulk string whose header was read; -1: none
        self._args: list[bytes] = []

    @property
    def pending(self) -> bytes:
        """The bytes of the incomplete command at the end of the stream fed so far."""
        return bytes(self._buf[self._start:])

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start:
            del self._buf[:self._start]
            self._pos -= self._start
            self._start = 0
        self._buf += data

    def __iter__(self) -> Iterator[Command]:
        while (command := self.next()) is not None:
            yield command

    def next(self) -> Command | None:
        """The next complete command, or None until more bytes are fed."""
        buf, limits = self._buf, self.limits
        while True:
            if self._argc < 0:
                self._start = self._pos
                if self._pos >= len(buf):
                    return None
                if buf[self._pos] != ord("*"):
                    inline = self._inline()
                    if inline is None:
                        return None
                    if inline:
                        return inline
                    continue
                line = self._header_line("an array length")
                if line is None:
                    return None
                count = -1 if line == b"-1" else _number(line, "an array length")
                if count > limits.max_args:
                    raise ProtocolError(f"expected an array of at most {limits.max_args} "
                                        f"arguments, got {count}")
                if count <= 0:          # *0 and *-1: nothing to run, as Redis skips them
                    self._done()
                    continue
                self._argc, self._args = count, []
            while self._argc > 0:
                if self._bulk < 0:
                    line = self._header_line("a bulk string header '$<length>'", b"$")
                    if line is None:
                        return None
                    size = _number(line, "a bulk string length")
                    if size > limits.max_bulk:
                        raise ProtocolError(f"expected a bulk string of at most "
                                            f"{limits.max_bulk} bytes, got a length of {size}")
                    if self._pos + size + 2 - self._start > limits.max_command:
                        raise ProtocolError(f"expected a command of at most "
                                            f"{limits.max_command} bytes, got one of at least "
                                            f"{self._pos + size + 2 - self._start}")
                    self._bulk = size
                end = self._pos + self._bulk
                if len(buf) < end + 2:
                    if len(buf) > end and buf[end] != CRLF[0]:
                        raise ProtocolError(f"expected CRLF after a bulk string of "
                                            f"{self._bulk} bytes, got {bytes(buf[end:end + 2])!r}")
                    return None
                if buf[end:end + 2] != CRLF:
                    raise ProtocolError(f"expected CRLF after a bulk string of {self._bulk} "
                                        f"bytes, got {bytes(buf[end:end + 2])!r}")
                self._args.append(bytes(buf[self._pos:end]))
                self._pos, self._bulk = end + 2, -1
                self._argc -= 1
            command = tuple(self._args)
            self._done()
            return command

    def _done(self) -> None:
        self.consumed += self._pos - self._start
        self._start, self._argc, self._bulk, self._args = self._pos, -1, -1, []

    def _header_line(self, what: str, marker: bytes = b"*") -> bytes | None:
        """The digits of the `*`/`$` line at _pos, moving past it; None while incomplete."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return None
        if buf[pos:pos + 1] != marker:
            raise ProtocolError(f"expected {what}, got {bytes(buf[pos:pos + 8])!r}")
        end = buf.find(CRLF, pos + 1, pos + MAX_HEADER_LINE)
        if end < 0:
            seen = bytes(buf[pos + 1:pos + MAX_HEADER_LINE])
            if len(buf) - pos >= MAX_HEADER_LINE or not _NUMBER_PREFIX.fullmatch(seen):
                raise ProtocolError(f"expected {what} as decimal digits and CRLF within "
                                    f"{MAX_HEADER_LINE} bytes, got {bytes(buf[pos:pos + 16])!r}")
            return None
        self._pos = end + 2
        return bytes(buf[pos + 1:end])

    def _inline(self) -> Command | None:
        """The inline command at _pos (() for a blank line); None while incomplete."""
        buf, pos, top = self._buf, self._pos, self.limits.max_inline
        end = buf.find(b"\n", pos, pos + top)
        if end < 0:
            if len(buf) - pos >= top:
                raise ProtocolError(f"expected an inline command of at most {top} bytes "
                                    f"ending in a newline, got {len(buf) - pos} bytes without one")
            return None
        line = bytes(buf[pos:end])
        args = split_inline(line[:-1] if line.endswith(b"\r") else line)
        if len(args) > self.limits.max_args:
            raise ProtocolError(f"expected an inline command of at most {self.limits.max_args} "
                                f"arguments, got {len(args)}")
        self._pos = end + 1
        self._done()
        return tuple(args)


def _number(digits: bytes, what: str) -> int:
    if not _NUMBER.fullmatch(digits):
        raise ProtocolError(f"expected {what} as decimal digits, got {digits[:20]!r}")
    return int(digits)


def split_inline(line: bytes) -> list[bytes]:
    """An inline command's arguments, split as Redis splits them (sdssplitargs): blanks
    separate; "double quotes" take \\n \\r \\t \\b \\a \\xHH and \\<any>; 'single quotes' take \\'.
    A closing quote must be followed by a blank or the end."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        arg = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise ProtocolError("expected a closing quote, got the end of the line "
                                        "(unbalanced quotes in request)")
                break
            c = line[i]
            if quote == ord('"') and c == ord("\\") and i + 3 < n and line[i + 1] == ord("x") \
                    and line[i + 2] in _HEX and line[i + 3] in _HEX:
                arg.append(int(line[i + 2:i + 4], 16))
                i += 4
            elif quote == ord('"') and c == ord("\\") and i + 1 < n:
                arg.append(_ESCAPES.get(line[i + 1], line[i + 1]))
                i += 2
            elif quote == ord("'") and c == ord("\\") and i + 1 < n and line[i + 1] == ord("'"):
                arg.append(ord("'"))
                i += 2
            elif quote and c == quote:
                if i + 1 < n and line[i + 1] not in _SPACE:
                    raise ProtocolError(f"expected a blank after a closing quote, got "
                                        f"{line[i + 1:i + 2]!r} (unbalanced quotes in request)")
                i += 1
                break
            elif quote:
                arg.append(c)
                i += 1
            elif c in _SPACE:
                break
            elif c in b"\"'":
                quote = c
                i += 1
            else:
                arg.append(c)
                i += 1
        args.append(bytes(arg))


def parse(data: bytes, limits: Limits | None = None) -> tuple[list[Command], int]:
    """The complete commands at the start of data and the bytes they take."""
    parser = RequestParser(limits)
    parser.feed(data)
    return list(parser), parser.consumed


# ------------------------------------------------------------------ replies

def simple(text: str) -> bytes:
    if "\r" in text or "\n" in text:
        raise ValueError(f"a simple string cannot hold CR or LF, got {text!r}")
    return b"+" + text.encode() + CRLF


def error(message: str) -> bytes:
    """An error reply; its first word is the code (ERR, NOPROTO...). CR/LF become blanks."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + CRLF


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(data: bytes | None) -> bytes:
    return NULL_BULK if data is None else b"$%d\r\n%b\r\n" % (len(data), data)


def array(items: Iterable[bytes]) -> bytes:
    """An array of replies already encoded."""
    items = list(items)
    return b"*%d\r\n" % len(items) + b"".join(items)


def command(*args: bytes) -> bytes:
    """A request as clients send it: an array of bulk strings."""
    return array(bulk(a) for a in args)


OK = simple("OK")
PONG = simple("PONG")
NULL_BULK = b"$-1\r\n"
EMPTY_ARRAY = b"*0\r\n"


def closes_connection(command: Command) -> bool:
    """QUIT: the server answers +OK, then closes the connection."""
    return bool(command) and command[0].upper() == b"QUIT"


# ------------------------------------------------------------------ key space

_MAGIC = b"TKV1"
_HEAD = struct.Struct("!4sQI")
_LEN = struct.Struct("!I")
_ENTRY_OVERHEAD = 2 * _LEN.size
_CONFIG = {b"save": b"", b"appendonly": b"no", b"databases": b"1"}


def _entry_size(key: bytes, value: bytes) -> int:
    return _ENTRY_OVERHEAD + len(key) + len(value)


def _int64(data: bytes) -> int | None:
    if not _INT64.fullmatch(data):
        return None
    value = int(data)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _name(data: bytes) -> str:
    return data[:128].decode("utf-8", "replace")


class KvState:
    """A key space of bytes -> bytes and the commands over it; execute() never raises for a
    command, it answers errors as Redis does."""

    def __init__(self, *, max_bytes: int = 256 << 10, max_keys: int = 100_000) -> None:
        if max_bytes < _HEAD.size or max_keys < 0:
            raise ValueError(f"expected max_bytes >= {_HEAD.size} and max_keys >= 0, got "
                             f"{max_bytes} and {max_keys}")
        self.max_bytes, self.max_keys = max_bytes, max_keys
        self.data: dict[bytes, bytes] = {}
        self.generation = 0
        self.size = _HEAD.size
        """The snapshot's length in bytes."""
        self._undo: list[tuple[bytes, bytes | None]] | None = None
        self._undo_at = (0, 0)
        self._snapshot: bytes | None = None
        self._commands: dict[bytes, Callable[[Command], bytes]] = {
            b"PING": self._ping, b"ECHO": self._echo, b"GET": self._get, b"SET": self._set,
            b"INCR": self._incr, b"DECR": self._incr, b"INCRBY": self._incr,
            b"DECRBY": self._incr, b"DEL": self._del, b"EXISTS": self._exists,
            b"DBSIZE": self._dbsize, b"COMMAND": self._command, b"CONFIG": self._config,
            b"HELLO": self._hello, b"CLIENT": self._client, b"SELECT": self._select,
            b"INFO": self._info, b"QUIT": lambda _: OK,
        }
        self._arity = {b"PING": (1, 2), b"ECHO": (2, 2), b"GET": (2, 2), b"SET": (3, None),
                       b"INCR": (2, 2), b"DECR": (2, 2), b"INCRBY": (3, 3), b"DECRBY": (3, 3),
                       b"DEL": (2, None), b"EXISTS": (2, None), b"DBSIZE": (1, 1),
                       b"COMMAND": (1, None), b"CONFIG": (2, None), b"HELLO": (1, None),
                       b"CLIENT": (2, None), b"SELECT": (2, 2), b"INFO": (1, None),
                       b"QUIT": (1, None)}

    # -------------------------------------------------------------- commands
    def execute(self, command: Command) -> bytes:
        """The reply to one command, applying it to the key space."""
        if not command:
            return b""
        name = command[0].upper()
        run = self._commands.get(name)
        if run is None:
            shown = " ".join(f"'{_name(a)}'" for a in command[1:4])
            return error(f"ERR unknown command '{_name(command[0])}', with args beginning "
                         f"with: {shown}")
        low, high = self._arity[name]
        if len(command) < low or (high is not None and len(command) > high):
            return error(f"ERR wrong number of arguments for '{name.decode().lower()}' command")
        return run(command)

    def _ping(self, c: Command) -> bytes:
        return PONG if len(c) == 1 else bulk(c[1])

    def _echo(self, c: Command) -> bytes:
        return bulk(c[1])

    def _get(self, c: Command) -> bytes:
        return bulk(self.data.get(c[1]))

    def _set(self, c: Command) -> bytes:
        key, value = c[1], c[2]
        condition, want_old, expiry = b"", False, False
        options = iter(c[3:])
        for option in options:
            word = option.upper()
            if word in (b"NX", b"XX") and not condition:
                condition = word
            elif word in (b"EX", b"PX", b"EXAT", b"PXAT") and not expiry:
                when = next(options, None)
                if when is None:
                    return error("ERR syntax error")
                seconds = _int64(when)
                if seconds is None:
                    return error("ERR value is not an integer or out of range")
                if seconds <= 0:
                    return error("ERR invalid expire time in 'set' command")
                expiry = True
            elif word == b"KEEPTTL" and not expiry:
                expiry = True
            elif word == b"GET" and not want_old:
                want_old = True
            else:
                return error("ERR syntax error")
        old = self.data.get(key)
        applies = (condition != b"NX" or old is None) and (condition != b"XX" or old is not None)
        if applies:
            refused = self._put(key, value)
            if refused:
                return refused
        if want_old:
            return bulk(old)
        return OK if applies else NULL_BULK

    def _incr(self, c: Command) -> bytes:
        name = c[0].upper()
        if name in (b"INCRBY", b"DECRBY"):
            step = _int64(c[2])
            if step is None:
                return error("ERR value is not an integer or out of range")
        else:
            step = 1
        if name.startswith(b"DECR"):
            if step == _INT64_MIN:
                return error("ERR decrement would overflow")
            step = -step
        old = self.data.get(c[1], b"0")
        value = _int64(old)
        if value is None:
            return error("ERR value is not an integer or out of range")
        new = value + step
        if not _INT64_MIN <= new <= _INT64_MAX:
            return error("ERR increment or decrement would overflow")
        refused = self._put(c[1], b"%d" % new)
        return refused or integer(new)

    def _del(self, c: Command) -> bytes:
        return integer(sum(self._delete(key) for key in c[1:]))

    def _exists(self, c: Command) -> bytes:
        return integer(sum(key in self.data for key in c[1:]))

    def _dbsize(self, c: Command) -> bytes:
        return integer(len(self.data))

    def _command(self, c: Command) -> bytes:
        sub = c[1].upper() if len(c) > 1 else b""
        if sub in (b"", b"DOCS", b"INFO", b"LIST"):
            return EMPTY_ARRAY
        if sub == b"COUNT":
            return integer(0)
        return error(f"ERR unknown subcommand '{_name(c[1])}'. Try COMMAND HELP.")

    def _config(self, c: Command) -> bytes:
        if c[1].upper() != b"GET" or len(c) < 3:
            return error(f"ERR unknown subcommand or wrong number of arguments for "
                         f"'{_name(c[1])}'. Try CONFIG HELP.")
        found = {p.lower() for p in c[2:]} & _CONFIG.keys()
        return array(bulk(x) for name in sorted(found) for x in (name, _CONFIG[name]))

    def _hello(self, c: Command) -> bytes:
        return error("NOPROTO sorry, this protocol version is not supported")

    def _client(self, c: Command) -> bytes:
        sub = c[1].upper()
        if sub in (b"SETNAME", b"SETINFO") and len(c) >= 3:
            return OK
        return error(f"ERR unknown subcommand or wrong number of arguments for "
                     f"'{_name(c[1])}'. Try CLIENT HELP.")

    def _select(self, c: Command) -> bytes:
        return OK if c[1] == b"0" else error("ERR DB index is out of range")

    def _info(self, c: Command) -> bytes:
        text = ("# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n"
                "tcpcp_kvserver:1\r\n\r\n# Keyspace\r\n"
                f"db0:keys={len(self.data)},expires=0,avg_ttl=0\r\n"
                f"tcpcp_generation:{self.generation}\r\n"
                f"tcpcp_snapshot_bytes:{self.size}/{self.max_bytes}\r\n")
        return bulk(text.encode())

    # -------------------------------------------------------------- writes
    def _put(self, key: bytes, value: bytes) -> bytes | None:
        """Store key; an error reply instead if the key space would pass its bounds."""
        old = self.data.get(key)
        size = self.size + _entry_size(key, value) - (0 if old is None else
                                                      _entry_size(key, old))
        if old is None and len(self.data) >= self.max_keys:
            return error(f"ERR tcpcp key space full: {len(self.data)} keys, at most "
                         f"{self.max_keys}")
        if size > self.max_bytes:
            return error(f"ERR tcpcp key space full: a snapshot of {size} bytes, at most "
                         f"{self.max_bytes}")
        self._record(key, old)
        self.data[key] = value
        self.size = size
        return None

    def _delete(self, key: bytes) -> bool:
        old = self.data.get(key)
        if old is None:
            return False
        self._record(key, old)
        del self.data[key]
        self.size -= _entry_size(key, old)
        return True

    def _record(self, key: bytes, old: bytes | None) -> None:
        if self._undo is not None:
            self._undo.append((key, old))
        self.generation += 1
        self._snapshot = None

    # -------------------------------------------------------------- savepoints
    def savepoint(self) -> None:
        """Start recording writes, so rollback() can undo them."""
        self._undo = []
        self._undo_at = (self.generation, self.size)

    def rollback(self) -> None:
        """Undo every write since savepoint(): the snapshot is again what it was then."""
        if self._undo is None:
            raise RuntimeError("rollback() without a savepoint()")
        for key, old in reversed(self._undo):
            if old is None:
                del self.data[key]
            else:
                self.data[key] = old
        self.generation, self.size = self._undo_at
        self._undo, self._snapshot = None, None

    def release(self) -> None:
        """Keep the writes since savepoint() and stop recording."""
        self._undo = None

    # -------------------------------------------------------------- snapshots
    def snapshot(self) -> bytes:
        if self._snapshot is None:
            parts = [_HEAD.pack(_MAGIC, self.generation, len(self.data))]
            for key in sorted(self.data):
                value = self.data[key]
                parts += (_LEN.pack(len(key)), key, _LEN.pack(len(value)), value)
            self._snapshot = b"".join(parts)
        return self._snapshot

    @classmethod
    def restore(cls, blob: bytes, *, max_bytes: int = 256 << 10,
                max_keys: int = 100_000) -> KvState:
        """The key space a snapshot holds; SnapshotError if it is not one, or passes the
        bounds."""
        if len(blob) > max_bytes:
            raise SnapshotError(f"expected a snapshot of at most {max_bytes} bytes, got "
                                f"{len(blob)}")
        if len(blob) < _HEAD.size:
            raise SnapshotError(f"expected a snapshot header of {_HEAD.size} bytes, got "
                                f"{len(blob)}")
        magic, generation, count = _HEAD.unpack_from(blob)
        if magic != _MAGIC:
            raise SnapshotError(f"expected magic {_MAGIC!r}, got {magic!r}")
        if count > max_keys:
            raise SnapshotError(f"expected at most {max_keys} keys, got {count}")
        state = cls(max_bytes=max_bytes, max_keys=max_keys)
        pos, last = _HEAD.size, None
        for i in range(count):
            key, pos = _field(blob, pos, f"key {i}")
            value, pos = _field(blob, pos, f"value {i}")
            if last is not None and key <= last:
                raise SnapshotError(f"expected key {i} after {last[:32]!r} in byte order, got "
                                    f"{key[:32]!r}")
            state.data[key], last = value, key
        if pos != len(blob):
            raise SnapshotError(f"expected the snapshot to end after {count} keys at byte "
                                f"{pos}, got {len(blob) - pos} more bytes")
        state.generation, state.size, state._snapshot = generation, len(blob), bytes(blob)
        return state


def _field(blob: bytes, pos: int, what: str) -> tuple[bytes, int]:
    if pos + _LEN.size > len(blob):
        raise SnapshotError(f"expected the length of {what} at byte {pos}, got the end")
    (size,) = _LEN.unpack_from(blob, pos)
    pos += _LEN.size
    if pos + size > len(blob):
        raise SnapshotError(f"expected {size} bytes of {what} at byte {pos}, got "
                            f"{len(blob) - pos}")
    return blob[pos:pos + size], pos + size


# ------------------------------------------------------------------ a connection's state

_CONN_MAGIC = b"TKC1"
_CONN_HEAD = struct.Struct("!4sI")
CONNECTION_STATE_OVERHEAD = _CONN_HEAD.size
"""Bytes a ConnectionState adds to its snapshot and pending input."""


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """What the key-value server commits for one connection: the key-space snapshot, and the
    start of a command still arriving when the server counted it as consumed (so that the
    gate acknowledges it, see ops/apps/kvserver.py).

        magic "TKC1" | snapshot u32 len + bytes | pending input (the rest)
    """

    snapshot: bytes
    pending: bytes = b""

    def encode(self) -> bytes:
        return _CONN_HEAD.pack(_CONN_MAGIC, len(self.snapshot)) + self.snapshot + self.pending

    @classmethod
    def decode(cls, blob: bytes) -> ConnectionState:
        if len(blob) < _CONN_HEAD.size:
            raise SnapshotError(f"expected a connection state header of {_CONN_HEAD.size} "
                                f"bytes, got {len(blob)}")
        magic, size = _CONN_HEAD.unpack_from(blob)
        if magic != _CONN_MAGIC:
            raise SnapshotError(f"expected magic {_CONN_MAGIC!r}, got {magic!r}")
        end = _CONN_HEAD.size + size
        if end > len(blob):
            raise SnapshotError(f"expected a snapshot of {size} bytes, got "
                                f"{len(blob) - _CONN_HEAD.size}")
        return cls(blob[_CONN_HEAD.size:end], blob[end:])
