"""The `gate_backend` parametrization (tests/conftest.py): every backend the kernel has, narrowed
by TCPCP_GATE_BACKENDS, and a clear error (not a silent skip) for one the kernel lacks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import gate_backends


def test_every_backend_the_kernel_has_is_used_when_nothing_is_asked() -> None:
    assert gate_backends(None, option_present=False) == ["bpf"]
    assert gate_backends("", option_present=True) == ["bpf", "patch"]


def test_the_environment_narrows_the_list() -> None:
    assert gate_backends("patch", option_present=True) == ["patch"]
    assert gate_backends(" bpf , patch ", option_present=True) == ["bpf", "patch"]


@pytest.mark.parametrize(("requested", "present"), [("patch", False), ("bpf,ebpf", True),
                                                     (",", True)])
def test_a_backend_the_kernel_lacks_is_a_usage_error_naming_what_it_has(
        requested: str, present: bool) -> None:
    with pytest.raises(pytest.UsageError, match=r"expected TCPCP_GATE_BACKENDS to name"):
        gate_backends(requested, option_present=present)


@given(st.lists(st.sampled_from(["bpf", "patch"]), min_size=1), st.booleans())
def test_whatever_is_accepted_is_a_backend_the_kernel_has(names: list[str], present: bool
                                                         ) -> None:
    try:
        got = gate_backends(",".join(names), option_present=present)
    except pytest.UsageError:
        assert "patch" in names and not present
    else:
        assert got == names and set(got) <= {"bpf"} | ({"patch"} if present else set())
