"""The pass state table (kernel/pass_states.py): transitions, undo lists, and endings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.pass_states import (
    TRANSITIONS,
    UNDO,
    Ending,
    PassStateError,
    State,
    Step,
    Undo,
    advance,
    endings,
    undo,
)

ORDER = [Step.ISOLATE, Step.DUMP, Step.SEND, Step.REPORT, Step.SWITCH, Step.ACTIVATE]


def test_the_steps_in_order_lead_from_chosen_to_activated() -> None:
    state = State.CHOSEN
    for step in ORDER:
        state = advance(state, step)
    assert state is State.ACTIVATED


@given(st.sampled_from(State), st.sampled_from(Step))
def test_a_step_out_of_order_is_refused_naming_state_and_step(state: State, step: Step) -> None:
    if (state, step) in TRANSITIONS:
        assert advance(state, step) in State
    else:
        with pytest.raises(PassStateError, match=f"{step.value}.*{state.value}"):
            advance(state, step)


def test_every_state_before_activation_has_an_undo_and_activated_has_none() -> None:
    assert set(UNDO) == set(State) - {State.ACTIVATED}
    with pytest.raises(PassStateError, match="may own"):
        undo(State.ACTIVATED)


@given(st.sampled_from([s for s in State if s is not State.ACTIVATED]))
def test_undo_takes_back_exactly_what_the_states_so_far_did(state: State) -> None:
    steps = undo(state)
    reached = list(State).index(state)
    assert (Undo.LIFT_ISOLATION in steps) == (reached >= list(State).index(State.ISOLATED))
    assert (Undo.REPAIR_OFF in steps) == (reached >= list(State).index(State.DUMPED))
    assert (Undo.ABORT_REMOTE in steps) == (reached >= list(State).index(State.SENT))
    assert (Undo.UNSWITCH in steps) == (state is State.SWITCHED)
    if steps:  # traffic first, isolation last: the socket is live before packets reach it
        assert steps[-1] is Undo.LIFT_ISOLATION
        assert steps[0] in (Undo.UNSWITCH, Undo.ABORT_REMOTE, Undo.REPAIR_OFF,
                            Undo.LIFT_ISOLATION)


@st.composite
def passes(draw: st.DrawFn) -> tuple[int, list[int], list[int], bool]:
    n = draw(st.integers(0, 30))
    refused = draw(st.lists(st.integers(0, max(n - 1, 0)), unique=True)) if n else []
    restored = [i for i in range(n) if i not in refused]
    failed = draw(st.lists(st.sampled_from(restored), unique=True)) if restored else []
    return n, refused, failed, draw(st.booleans())


@given(passes())
def test_every_connection_ends_exactly_one_way(p: tuple[int, list[int], list[int], bool]) -> None:
    n, refused, failed, done_came = p
    restored = [i for i in range(n) if i not in refused]
    done = ([i for i in restored if i not in failed], [(i, "x") for i in failed]) \
        if done_came else None
    ends = endings(n, [(i, "r") for i in refused], done)
    assert len(ends) == n
    for i, e in enumerate(ends):
        if i in refused:
            assert e.ending is Ending.RESUMED
        elif not done_came:
            assert e.ending is Ending.CLOSED and "never confirmed" in e.reason
        elif i in failed:
            assert e.ending is Ending.RESUMED
        else:
            assert e.ending is Ending.PASSED and e.reason == ""


def test_answers_that_leave_a_connection_out_are_refused() -> None:
    with pytest.raises(PassStateError, match=r"\[2\]"):
        endings(3, [(0, "r")], ([1], []))
