"""Property tests of checkpointer/snapshot.py: the registration anchors map stream positions to
sequence numbers, and every checkpoint built from them encodes, decodes and restores to where
the planner expects."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpointer.snapshot import SnapshotError, Template, checkpoint_ici, commit_seq, state_of
from kernel.codec import decode, encode
from kernel.ici import Ici, TcpState
from kernel.seq import seq_add, seq_diff
from tests.unit.test_ici_codec import icis

established = icis.map(lambda i: replace(i, state=TcpState.ESTABLISHED, fin_sent=False))
positions = st.integers(0, 1 << 50)
steps = st.integers(0, 1 << 31)


@given(established, positions, positions, steps, steps, st.booleans(), st.booleans(),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 1 << 50))
def test_a_checkpoint_pins_the_sequence_of_each_position(
        dumped: Ici, consumed0: int, produced0: int, read: int, written: int, peer_fin: bool,
        our_fin: bool, tsval: int, at_ms: int) -> None:
    t = Template.of(dumped, consumed0, produced0)
    ici = checkpoint_ici(t, consumed=consumed0 + read, produced=produced0 + written,
                         peer_fin=peer_fin, our_fin=our_fin, tsval=tsval, read_at_ms=at_ms)
    # the registration's unread bytes come first: position consumed0 is the receive queue's start
    assert seq_diff(ici.rcv_nxt, dumped.rcv_queue_seq) % 2**32 == (read + peer_fin) % 2**32
    # everything written before registration is in the kernel: produced0 is write_seq
    assert seq_diff(ici.snd_una, dumped.write_seq) % 2**32 == written % 2**32
    assert ici.sent == ici.unsent == ici.received == b""
    assert ici.state is state_of(peer_fin, our_fin)
    assert (ici.peer_fin, ici.our_fin) == (peer_fin, our_fin)
    assert ici.window.rcv_wup == ici.rcv_nxt == commit_seq(t, consumed0 + read, peer_fin)
    assert (ici.timestamp.tsval, ici.timestamp.read_at_ms) == (tsval, at_ms)
    assert (ici.identity, ici.params, ici.sockopts) == \
        (dumped.identity, dumped.params, dumped.sockopts)
    assert decode(encode(ici)) == ici


@given(established, positions, st.integers(1, 1 << 20))
def test_positions_before_the_registration_are_refused(dumped: Ici, anchor: int,
                                                       back: int) -> None:
    t = Template.of(dumped, anchor + back, anchor + back)
    with pytest.raises(SnapshotError, match="expected at least"):
        t.rcv_seq(anchor)
    with pytest.raises(SnapshotError, match="expected at least"):
        t.snd_seq(anchor)


@given(established)
def test_a_position_a_sequence_space_away_asks_for_a_new_registration(dumped: Ici) -> None:
    t = Template.of(dumped, 0, 0)
    assert t.rcv_seq(0xFFFFFFFF) == seq_add(dumped.rcv_queue_seq, 0xFFFFFFFF)
    with pytest.raises(SnapshotError, match="re-register"):
        t.rcv_seq(1 << 32)


@given(icis.filter(lambda i: i.our_fin or i.peer_fin))
def test_only_an_established_connection_can_be_registered(dumped: Ici) -> None:
    with pytest.raises(SnapshotError, match="expected an ESTABLISHED connection"):
        Template.of(dumped, 0, 0)
