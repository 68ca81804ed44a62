"""Redis key names of the checkpoint store, one hash tag per origin host.

Every key of one origin carries the hash tag ``{origin}``, so in a Redis Cluster all of an
origin's keys share one slot and every Function call stays on one node:

    tcpcp:{origin}:meta    hash   epoch (fencing token), owner (holder that may write)
    tcpcp:{origin}:lease   string holder id, with the lease TTL
    tcpcp:{origin}:rec     hash   connection name -> signed record bytes
    tcpcp:{origin}:ver     hash   connection name -> record version
    tcpcp:{origin}:outpos  hash   connection name -> its output log's "start first end" offsets
    tcpcp:{origin}:out:<conn>  stream  the connection's output log: one signed append per entry

In an output log key the connection name is percent-escaped (IPv6 brackets become %5B, %5D):
no key can then end like an origin's ``}:meta``, nor hold a glob character.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import quote

from store.errors import StoreConfigError

PREFIX = "tcpcp"
META_PATTERN = PREFIX + ":{*}:meta"
_FORBIDDEN = set("{}*?[]\\")
_CONN_SAFE = ":>.-_@!,=+"  # kept as is in output log key names; everything else is escaped


def check_name(kind: str, name: str, max_bytes: int = 255, *, key_safe: bool = True) -> str:
    """Return `name` if it can be a name of this kind, else raise StoreConfigError.

    Every name is 1..max_bytes of UTF-8, printable, without whitespace. Names that go into
    key names (origins, holders: `key_safe`) must also avoid the hash-tag braces and the
    glob characters *?[]\\; connection names (hash fields) may hold them, e.g. IPv6 brackets.
    """
    if not isinstance(name, str):
        raise StoreConfigError(f"{kind} name must be a string, got {type(name).__name__}")
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if not 0 < size <= max_bytes:
        raise StoreConfigError(f"{kind} name must be 1..{max_bytes} bytes, got {size}: {name!r}")
    bad = sorted({c for c in name if (key_safe and c in _FORBIDDEN) or not c.isprintable()
                  or c.isspace()})
    if bad:
        rule = " or any of {}*?[]\\" if key_safe else ""
        raise StoreConfigError(
            f"{kind} name must be printable without spaces{rule}, "
            f"got {name!r} containing {''.join(bad)!r}"
        )
    return name


@dataclass(frozen=True, slots=True)
class OriginKeys:
    """The key names of one origin host."""

    origin: str

    def __post_init__(self) -> None:
        check_name("origin", self.origin)

    @property
    def tag(self) -> str:
        return f"{PREFIX}:{{{self.origin}}}"

    @property
    def meta(self) -> str:
        return f"{self.tag}:meta"

    @property
    def lease(self) -> str:
        return f"{self.tag}:lease"

    @property
    def records(self) -> str:
        return f"{self.tag}:rec"

    @property
    def versions(self) -> str:
        return f"{self.tag}:ver"

    @property
    def output_positions(self) -> str:
        return f"{self.tag}:outpos"

    def output(self, conn: str) -> str:
        """The key of connection `conn`'s output log (a stream)."""
        return f"{self.tag}:out:{quote(conn.encode('utf-8', errors='surrogatepass'), _CONN_SAFE)}"

    def all(self) -> tuple[str, str, str, str]:
        """The keys in the order the Function library expects them."""
        return (self.meta, self.lease, self.records, self.versions)


@functools.lru_cache(maxsize=4096)
def keys_of(origin: str) -> OriginKeys:
    """OriginKeys of `origin`, checked once and cached: every put needs them (hot path)."""
    return OriginKeys(origin)


def origin_of_meta_key(key: str | bytes) -> str | None:
    """The origin named by a ``tcpcp:{origin}:meta`` key, or None if the key is not one."""
    text = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key
    head, tail = f"{PREFIX}:{{", "}:meta"
    if text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail):
        return text[len(head):-len(tail)]
    return None
