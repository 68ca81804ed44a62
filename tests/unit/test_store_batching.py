"""put_many's split of records into FCALL batches (store/client.py `_chunks`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from store.client import _chunks

ITEMS = st.lists(st.tuples(st.text(max_size=3), st.integers(0, 9), st.binary(max_size=50)),
                 max_size=60)


@given(ITEMS, st.integers(1, 10), st.integers(1, 120))
def test_batches_keep_every_record_in_order_within_both_bounds(
        items: list[tuple[str, int, bytes]], count: int, max_bytes: int) -> None:
    batches = _chunks(items, count, max_bytes)
    assert [i for b in batches for i in b] == items
    for b in batches:
        assert 1 <= len(b) <= count
        assert len(b) == 1 or sum(len(i[2]) for i in b) <= max_bytes
