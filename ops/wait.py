"""Waiting for a condition instead of sleeping: the one helper tests, the lab and the demo use.

    wait_until(lambda: server.status()["conns"] == 3, 10, what="three connections")

polls `predicate` until it returns something truthy and returns that value. An exception the
predicate raises counts as "not yet". When the time runs out it raises WaitTimeout naming what was
awaited and the last value seen, chained from the last exception the predicate raised, so a
condition that never came true says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A condition did not come true in time; __cause__ is the predicate's last error, if any."""


def wait_until(predicate: Callable[[], T], timeout: float, *, what: str = "",
               interval: float = 0.01, max_interval: float = 0.2) -> T:
    """Poll predicate (interval doubling up to max_interval) until it is truthy; return it."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last: object = None
    delay = interval
    while True:
        try:
            last = predicate()
            last_exc = None
            if last:
                return last  # type: ignore[return-value]
        except Exception as exc:  # not yet: remember why
            last_exc = exc
        if time.monotonic() >= deadline:
            label = what or getattr(predicate, "__name__", "condition")
            detail = (f"last error {type(last_exc).__name__}: {last_exc}" if last_exc
                      else f"last value {last!r}")
            raise WaitTimeout(f"{label}: not true after {timeout:g} s ({detail})") from last_exc
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, max_interval)
