"""Which ACK-gate backend a request gets (pure part): automatic selection follows the kernel's
TCP_COMMIT_SEQ, an explicit bpf is always granted, an explicit patch only with the option."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.patch_gate import Backend, OptionAbsent, PatchGateError, choose_backend

automatic = st.sampled_from([None, "auto"])


@given(automatic, st.booleans())
def test_automatic_selection_is_patch_exactly_when_the_kernel_has_the_option(
        requested: str | None, present: bool) -> None:
    assert choose_backend(requested, present) is (Backend.PATCH if present else Backend.BPF)


@given(st.sampled_from(["bpf", Backend.BPF]), st.booleans())
def test_asking_for_bpf_gets_bpf_whatever_the_kernel(requested: str | Backend,
                                                     present: bool) -> None:
    assert choose_backend(requested, present) is Backend.BPF


@given(st.sampled_from(["patch", Backend.PATCH]))
def test_asking_for_patch_gets_patch_on_a_kernel_with_the_option(
        requested: str | Backend) -> None:
    assert choose_backend(requested, True) is Backend.PATCH


@given(st.sampled_from(["patch", Backend.PATCH]))
def test_asking_for_patch_without_the_option_raises_the_absent_error(
        requested: str | Backend) -> None:
    with pytest.raises(OptionAbsent, match=r"expected TCP_COMMIT_SEQ.*ENOPROTOOPT"):
        choose_backend(requested, False)
    assert issubclass(OptionAbsent, PatchGateError)


@given(st.text().filter(lambda t: t not in ("bpf", "patch", "auto")), st.booleans())
def test_an_unknown_backend_name_is_refused(requested: str, present: bool) -> None:
    with pytest.raises(ValueError, match="is not a valid Backend"):
        choose_backend(requested, present)
