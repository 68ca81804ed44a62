"""The TCP options of a captured segment, read from their raw bytes: each option as (kind, body),
and the fields the gate tests and guest captures look at (window scale, SACK blocks,
timestamps). Pure: no I/O."""

from __future__ import annotations

import struct

EOL, NOP, WSCALE, SACK, TIMESTAMP = 0, 1, 3, 5, 8


def options(raw: bytes) -> list[tuple[int, bytes]]:
    """(kind, body) of each option but NOPs, in order; the walk stops at EOL and at an option
    whose length is missing or below 2 (malformed)."""
    found: list[tuple[int, bytes]] = []
    i = 0
    while i < len(raw):
        kind = raw[i]
        if kind == EOL:
            break
        if kind == NOP:
            i += 1
            continue
        if i + 1 >= len(raw) or raw[i + 1] < 2:
            break
        length = raw[i + 1]
        found.append((kind, raw[i + 2:i + length]))
        i += length
    return found


def kinds(raw: bytes) -> list[int]:
    return [kind for kind, _ in options(raw)]


def sack_blocks(raw: bytes) -> list[tuple[int, int]]:
    """The (left, right) edges of the SACK blocks (whole 8-byte blocks only)."""
    return [struct.unpack_from("!II", body, j) for kind, body in options(raw) if kind == SACK
            for j in range(0, len(body) - 7, 8)]


def wscale(raw: bytes) -> int | None:
    """The window scale a SYN or SYN-ACK offers, None without the option."""
    return next((body[0] for kind, body in options(raw) if kind == WSCALE and len(body) == 1),
                None)


def timestamps(raw: bytes) -> tuple[int, int] | None:
    """(TSval, TSecr), None without the option."""
    return next((struct.unpack("!II", body) for kind, body in options(raw)
                 if kind == TIMESTAMP and len(body) == 8), None)
