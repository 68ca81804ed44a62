"""ops/tcpoptions on hand-built option bytes: SACK blocks, option kinds, the window scale and
timestamps are found after NOPs and other options, and a truncated option ends the walk."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from ops.tcpoptions import kinds, sack_blocks, timestamps, wscale

NOP, TS = b"\x01", b"\x08\x0a" + struct.pack("!II", 7, 9)


def _sack(blocks: list[tuple[int, int]]) -> bytes:
    return bytes([5, 2 + 8 * len(blocks)]) + b"".join(struct.pack("!II", *b) for b in blocks)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                min_size=1, max_size=3))
def test_sack_blocks_are_read_after_nops_and_timestamps(blocks: list[tuple[int, int]]) -> None:
    options = NOP + NOP + TS + _sack(blocks)
    assert sack_blocks(options) == blocks
    assert kinds(options) == [8, 5]
    assert timestamps(options) == (7, 9) and wscale(options) is None
    assert wscale(NOP + b"\x03\x03\x07" + options) == 7


def test_no_sack_option_means_no_blocks_and_a_truncated_option_ends_the_walk() -> None:
    assert sack_blocks(NOP + NOP + TS) == []
    assert sack_blocks(b"\x05") == []
    assert sack_blocks(TS + b"\x05\x01" + _sack([(1, 2)])) == []  # length 1: malformed
