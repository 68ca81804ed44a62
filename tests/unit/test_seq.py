"""Property tests of sequence arithmetic mod 2**32 against its definition."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kernel.seq import SEQ_MOD, after, before, between, seq_add, seq_diff

seqs = st.integers(min_value=0, max_value=SEQ_MOD - 1)
steps = st.integers(min_value=1, max_value=(1 << 31) - 1)


@given(seqs, steps)
def test_a_sequence_is_before_anything_less_than_half_the_space_ahead(a: int, n: int) -> None:
    b = seq_add(a, n)
    assert before(a, b)
    assert after(b, a)
    assert not before(b, a)
    assert seq_diff(b, a) == n


@given(seqs)
def test_a_sequence_is_neither_before_nor_after_itself(a: int) -> None:
    assert not before(a, a)
    assert not after(a, a)
    assert between(a, a, a)


@given(seqs, steps, steps)
def test_between_holds_exactly_for_the_forward_range(low: int, span: int, k: int) -> None:
    high = seq_add(low, span)
    inside = seq_add(low, k % (span + 1))
    assert between(inside, low, high)
    outside = seq_add(high, 1 + k % (SEQ_MOD - span - 1))
    assert not between(outside, low, high)


@given(seqs, st.integers(min_value=-(1 << 40), max_value=1 << 40))
def test_seq_add_wraps_into_32_bits(a: int, n: int) -> None:
    r = seq_add(a, n)
    assert 0 <= r < SEQ_MOD
    assert (r - a - n) % SEQ_MOD == 0


def test_wraparound_example_matches_the_kernel() -> None:
    assert before(0xFFFFFFF0, 0x10)
    assert after(0x10, 0xFFFFFFF0)
    assert between(0x5, 0xFFFFFFF0, 0x10)
