"""Duplicate-ACK replay after a forced ACK (pure part): copies are sent only when the commit
reaches the kernel's own ack, as many as the kernel sent duplicates of it, capped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kernel.gate import DUPACK_REPLAY_MAX, GateState, dupacks_to_replay

u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)


def _state(kernel_ack: int, kernel_dupacks: int) -> GateState:
    return GateState(snd_nxt=1, kernel_ack=kernel_ack, rcv_edge=kernel_ack + 1000,
                     ack_sent=kernel_ack, tsval=None, tsecr=0, rcv_wscale=7, packets=10,
                     acks_clamped=0, sack_stripped=0, windows_capped=0, frozen_dropped=0,
                     tsvals_raised=0, dupacks_dropped=0, kernel_dupacks=kernel_dupacks)


@given(u32, st.integers(min_value=0, max_value=1 << 20))
def test_commit_reaching_the_kernel_ack_replays_its_duplicates_up_to_the_cap(
        kernel_ack: int, dupacks: int) -> None:
    n = dupacks_to_replay(kernel_ack, _state(kernel_ack, dupacks))
    assert n == min(dupacks, DUPACK_REPLAY_MAX)
    assert DUPACK_REPLAY_MAX > 3  # beyond the peer's default fast-retransmit threshold


@given(u32, u32, st.integers(min_value=0, max_value=1 << 20))
def test_commit_short_of_the_kernel_ack_replays_nothing(
        committed: int, kernel_ack: int, dupacks: int) -> None:
    if committed == kernel_ack:
        committed ^= 1
    assert dupacks_to_replay(committed, _state(kernel_ack, dupacks)) == 0
