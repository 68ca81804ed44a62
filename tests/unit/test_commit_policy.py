"""The commit policy (pure): idle flush always, a short timer, optional byte threshold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpointer.commit_policy import (
    CommitPolicy,
    PolicyError,
    PolicyState,
    Read,
    Reason,
    Tick,
    WouldBlock,
    committed_seq,
    decide,
    next_deadline,
)

policies = st.builds(
    CommitPolicy,
    interval_s=st.one_of(st.none(), st.floats(min_value=0.001, max_value=0.1)),
    every_bytes=st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 20)),
)
# (kind, amount, time step): reads of 1..64 KiB, would-block, ticks
steps = st.lists(st.tuples(st.sampled_from(["read", "block", "tick"]),
                           st.integers(min_value=1, max_value=65536),
                           st.floats(min_value=0, max_value=0.02)), max_size=80)


def _run(policy: CommitPolicy, script: list[tuple[str, int, float]]
         ) -> list[tuple[PolicyState, Reason | None, str]]:
    state, now, seen = PolicyState(), 0.0, []
    for kind, n, dt in script:
        now += dt
        due = next_deadline(policy, state)
        if due is not None and due <= now:  # the timer fires before anything later happens
            state, reason = decide(policy, state, Tick(due))
            seen.append((state, reason, "deadline"))
        event = Read(n, now) if kind == "read" else WouldBlock(now) if kind == "block" \
            else Tick(now)
        state, reason = decide(policy, state, event)
        seen.append((state, reason, kind))
    return seen


def test_default_policy_is_idle_flush_plus_a_short_timer_not_a_byte_threshold() -> None:
    policy = CommitPolicy()
    assert policy.every_bytes is None
    assert policy.interval_s is not None and policy.interval_s <= 0.05


@given(policies, steps)
def test_nothing_stays_uncommitted_when_the_application_would_block(
        policy: CommitPolicy, script: list[tuple[str, int, float]]) -> None:
    for state, reason, kind in _run(policy, script):
        if kind == "block":
            assert state.pending == 0
            assert reason is None or reason is Reason.IDLE


@given(policies, steps)
def test_committed_bytes_only_grow_and_never_pass_consumed(
        policy: CommitPolicy, script: list[tuple[str, int, float]]) -> None:
    last = 0
    for state, reason, _ in _run(policy, script):
        assert last <= state.committed <= state.consumed
        assert (state.committed > last) <= (reason is not None)
        last = state.committed


@given(policies, steps)
def test_timer_bounds_how_long_a_byte_waits_for_its_commit(
        policy: CommitPolicy, script: list[tuple[str, int, float]]) -> None:
    for state, _, _ in _run(policy, script):
        if policy.interval_s is not None and state.pending_since is not None:
            assert state.now - state.pending_since < policy.interval_s + 1e-9


@given(policies, steps)
def test_byte_threshold_caps_the_pending_bytes_after_every_read(
        policy: CommitPolicy, script: list[tuple[str, int, float]]) -> None:
    for state, _, kind in _run(policy, script):
        if policy.every_bytes is not None and kind == "read":
            assert state.pending < policy.every_bytes


def test_end_of_stream_commits_at_once_and_counts_the_fin() -> None:
    policy = CommitPolicy(interval_s=None)
    state, reason = decide(policy, PolicyState(), Read(100, 1.0))
    assert reason is None
    state, reason = decide(policy, state, Read(0, 1.1))
    assert reason is Reason.EOF and state.eof_committed and state.committed == 100
    assert committed_seq(1000, state.committed, state.eof_committed) == 1101
    with pytest.raises(PolicyError, match="no read after end of stream"):
        decide(policy, state, Read(5, 1.2))


@given(st.integers(min_value=0, max_value=(1 << 32) - 1), st.integers(min_value=0,
       max_value=1 << 40), st.booleans())
def test_committed_seq_wraps_modulo_2_32(base: int, nbytes: int, eof: bool) -> None:
    seq = committed_seq(base, nbytes, eof)
    assert 0 <= seq < 1 << 32
    assert (seq - base - nbytes - eof) % (1 << 32) == 0


def test_time_going_back_and_nonsense_policies_are_refused() -> None:
    state, _ = decide(CommitPolicy(), PolicyState(), Read(1, 5.0))
    with pytest.raises(PolicyError, match="time must not go back"):
        decide(CommitPolicy(), state, Tick(4.0))
    with pytest.raises(PolicyError, match="interval_s must be > 0"):
        CommitPolicy(interval_s=0)
    with pytest.raises(PolicyError, match="every_bytes must be > 0"):
        CommitPolicy(every_bytes=0)
