"""The BPF maps' key and value layouts, read by cffi from gate.h (the one place they are declared).

`Flow` names a connection from the local side; `flow_key(flow)` is its map key; `new`, `to_bytes`
and `from_bytes` turn the structs of gate.h into the exact bytes the C programs read and back.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

HEADER = Path(__file__).resolve().parent / "gate.h"

_DEFINE = re.compile(r"^#define\s+\w+\s+\d+\s*$")


def _cdef_text() -> str:
    lines = []
    for line in HEADER.read_text().splitlines():
        if line.startswith("#") and not _DEFINE.match(line):
            continue
        lines.append(line)
    return "\n".join(lines)


ffi = cffi.FFI()
ffi.cdef("typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;\n"
         + _cdef_text())
consts: Any = ffi.dlopen(None)

GATE_GUARDED: int = consts.GATE_GUARDED
GATE_FROZEN: int = consts.GATE_FROZEN
FLOW_FAMILY_V4: int = consts.FLOW_FAMILY_V4
FLOW_FAMILY_V6: int = consts.FLOW_FAMILY_V6


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Flow:
    """A TCP connection seen from the local host (origin or standby)."""

    local_addr: IpAddress
    local_port: int
    remote_addr: IpAddress
    remote_port: int

    @classmethod
    def of(cls, local: tuple[str, int], remote: tuple[str, int]) -> Flow:
        """Flow from (address, port) pairs as sockets report them."""
        return cls(ipaddress.ip_address(local[0].split("%")[0]), local[1],
                   ipaddress.ip_address(remote[0].split("%")[0]), remote[1])

    @property
    def family(self) -> int:
        return FLOW_FAMILY_V4 if self.local_addr.version == 4 else FLOW_FAMILY_V6

    def __str__(self) -> str:
        return f"{self.local_addr}:{self.local_port}>{self.remote_addr}:{self.remote_port}"


@functools.lru_cache(maxsize=65536)
def flow_key(flow: Flow) -> bytes:
    """The flow's struct flow_key (addresses and ports in network byte order); cached."""
    if flow.local_addr.version != flow.remote_addr.version:
        raise ValueError(f"expected one address family in flow {flow}, got both")
    key = new("struct flow_key", family=flow.family)
    key.local_addr = list(_words(flow.local_addr))
    key.remote_addr = list(_words(flow.remote_addr))
    key.local_port = int.from_bytes(flow.local_port.to_bytes(2, "big"), sys.byteorder)
    key.remote_port = int.from_bytes(flow.remote_port.to_bytes(2, "big"), sys.byteorder)
    return to_bytes(key)


def _words(addr: IpAddress) -> tuple[int, int, int, int]:
    raw = addr.packed.ljust(16, b"\0")
    w = [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]
    return (w[0], w[1], w[2], w[3])


def new(ctype: str, **fields: int) -> Any:
    """A zeroed struct of ctype ("struct gate_config") with the given fields set."""
    value = ffi.new(f"{ctype} *")
    for name, v in fields.items():
        setattr(value, name, v)
    return value


def to_bytes(value: Any) -> bytes:
    """The raw bytes of a struct made by new()."""
    return bytes(ffi.buffer(value))


def from_bytes(ctype: str, raw: bytes) -> Any:
    """A struct of ctype read from raw map bytes."""
    value = ffi.new(f"{ctype} *")
    ffi.memmove(value, raw, ffi.sizeof(ctype))
    return value
