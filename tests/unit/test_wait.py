"""ops.wait.wait_until: returns the first truthy value, re-raises the last error on timeout."""

from __future__ import annotations

import itertools

import pytest

from ops.wait import WaitTimeout, wait_until


def test_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter) >= 3 and "ready", 5, interval=0.001) == "ready"


def test_timeout_chains_the_last_error_the_predicate_raised() -> None:
    def broken() -> bool:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(WaitTimeout, match="nobody home") as info:
        wait_until(broken, 0.05, what="server up", interval=0.001)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert "server up" in str(info.value)


def test_timeout_names_the_last_value_when_nothing_raised() -> None:
    with pytest.raises(WaitTimeout, match=r"last value 0"):
        wait_until(lambda: 0, 0.02, interval=0.001)


def test_an_error_followed_by_success_counts_as_success() -> None:
    calls = itertools.count()

    def flaky() -> int:
        n = next(calls)
        if n < 2:
            raise OSError("not yet")
        return n

    assert wait_until(flaky, 5, interval=0.001) == 2
