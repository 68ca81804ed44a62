"""The lab's hand-assembled drop programs: accepted by the verifier and right on real frames
(run with BPF_PROG_TEST_RUN against the kernel)."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ops import labfilter

_BPF_PROG_TEST_RUN = 10


def _run(fd: int, frame: bytes) -> int:
    data = ctypes.create_string_buffer(frame, len(frame))
    # union bpf_attr, test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
    # repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size
    attr = struct.pack("<IIIIQQIIIIQQIII", fd, 0, len(frame), 0, ctypes.addressof(data), 0, 1, 0,
                       0, 0, 0, 0, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(labfilter._SYS_BPF, _BPF_PROG_TEST_RUN, buf, len(attr))
    assert rc == 0, os.strerror(ctypes.get_errno())
    return int(struct.unpack_from("<I", buf.raw, 4)[0])  # retval


def _frame(src: str, dst: str) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, s.packed, d.packed)
        eth_type = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, s.packed, d.packed)
        eth_type = 0x86DD
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", eth_type) + ip + b"\x00" * 20


@pytest.fixture(scope="module")
def drop_to_blocked() -> int:
    blocked = ["10.77.2.20", "fd77:2::14", "10.77.1.2"]
    return labfilter.load(labfilter.drop_addresses(blocked, match="dst"))


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


def test_drop_all_drops_any_frame() -> None:
    fd = labfilter.load(labfilter.drop_all())
    try:
        assert _run(fd, _frame("10.0.0.1", "10.0.0.2")) == labfilter.TC_ACT_SHOT
        assert _run(fd, b"\x00" * 60) == labfilter.TC_ACT_SHOT
    finally:
        os.close(fd)


@settings(max_examples=300)
@given(addresses, addresses)
def test_address_filter_drops_exactly_the_blocked_destinations(drop_to_blocked: int, src: str,
                                                               dst: str) -> None:
    src_v = ipaddress.ip_address(src)
    dst_v = ipaddress.ip_address(dst)
    if src_v.version != dst_v.version:
        return
    expect = labfilter.TC_ACT_SHOT if dst in ("10.77.2.20", "fd77:2::14", "10.77.1.2") \
        else labfilter.TC_ACT_OK
    assert _run(drop_to_blocked, _frame(src, dst)) == expect


@pytest.mark.parametrize("dst", ["10.77.2.20", "fd77:2::14", "10.77.1.2"])
def test_address_filter_drops_blocked_and_passes_neighbours(drop_to_blocked: int, dst: str) -> None:
    src = "10.77.2.10" if "." in dst else "fd77:2::a"
    assert _run(drop_to_blocked, _frame(src, dst)) == labfilter.TC_ACT_SHOT
    near = str(ipaddress.ip_address(dst) + 1)
    assert _run(drop_to_blocked, _frame(src, near)) == labfilter.TC_ACT_OK
    assert _run(drop_to_blocked, _frame(dst, src)) == labfilter.TC_ACT_OK  # source is not matched


def test_non_ip_frames_pass(drop_to_blocked: int) -> None:
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\x00" * 28
    assert _run(drop_to_blocked, arp) == labfilter.TC_ACT_OK
