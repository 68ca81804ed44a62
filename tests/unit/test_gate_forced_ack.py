"""Forced ACKs (pure part): the window that keeps the right edge, and the packet bytes."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from kernel.bpf.layout import Flow
from kernel.forced_ack import MAX_WINDOW, AckSpec, ack_window, build_ack

u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
wscales = st.integers(min_value=0, max_value=14)


@given(u32, st.integers(min_value=0, max_value=1 << 30), wscales)
def test_ack_window_reaches_the_right_edge_with_the_smallest_field_or_caps(
        ack: int, span: int, ws: int) -> None:
    edge = (ack + span) & 0xFFFFFFFF
    w = ack_window(edge, ack, ws)
    assert 0 <= w <= MAX_WINDOW
    if w < MAX_WINDOW:
        assert w << ws >= span
        assert w == 0 or (w - 1) << ws < span


@given(u32, st.integers(min_value=1, max_value=1 << 30), wscales)
def test_ack_window_is_zero_when_the_edge_is_behind_the_ack(ack: int, back: int,
                                                            ws: int) -> None:
    assert ack_window((ack - back) & 0xFFFFFFFF, ack, ws) == 0


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
)


@given(addresses, st.integers(1, 65535), st.integers(1, 65535), u32, u32,
       st.integers(0, MAX_WINDOW), st.one_of(st.none(), u32), u32)
def test_forced_ack_is_a_pure_ack_with_a_valid_checksum(
        addrs: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...], sport: int,
        dport: int, seq: int, ack: int, window: int, tsval: int | None, tsecr: int) -> None:
    local, remote = addrs
    packet = build_ack(AckSpec(Flow(local, sport, remote, dport), seq, ack, window, tsval, tsecr))
    if local.version == 4:
        l4 = 20
        assert packet[9] == 6 and packet[12:16] == local.packed and packet[16:20] == remote.packed
    else:
        l4 = 40
        assert packet[6] == 6 and packet[8:24] == local.packed and packet[24:40] == remote.packed
    tcp = packet[l4:]
    got = struct.unpack("!HHIIBBH", tcp[:16])
    assert got == (sport, dport, seq, ack, (len(tcp) // 4) << 4, 0x10, window)
    assert (tsval is None) == (len(tcp) == 20)
    if tsval is not None:
        assert tcp[20:32] == b"\x01\x01\x08\x0a" + struct.pack("!II", tsval, tsecr)
    if local.version == 4:
        pseudo = local.packed + remote.packed + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = local.packed + remote.packed + struct.pack("!IxxxB", len(tcp), 6)
    assert _sum16(pseudo + tcp) == 0xFFFF


@given(st.binary(min_size=0, max_size=300))
def test_the_checksum_of_data_with_its_checksum_folded_in_is_zero(data: bytes) -> None:
    from kernel.segment import checksum

    padded = data + b"\0" * (len(data) % 2)
    assert checksum(padded + checksum(padded).to_bytes(2, "big")) == 0
