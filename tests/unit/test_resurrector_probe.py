"""Property tests of the standby's probe segment (kernel/probe.py) and of pinning a checkpoint's
send side on the peer's acknowledgement (resurrector/resurrect.py)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.ici import Family, Ici, TcpOption
from kernel.probe import PROBE_BEHIND, probe_packet, unreachable_message
from kernel.segment import checksum
from kernel.seq import seq_add, seq_diff
from resurrector.planner import PlanRefused
from resurrector.resurrect import pin_send_side
from tests.unit.test_ici_codec import icis


def _tcp(packet: bytes, family: Family) -> bytes:
    return packet[20:] if family is Family.IPV4 else packet[40:]


@given(icis, st.integers(0, 0xFFFFFFFF))
def test_the_probe_is_one_byte_far_behind_acking_the_commit_with_a_valid_checksum(
        ici: Ici, tsval: int) -> None:
    packet = probe_packet(ici, tsval)
    ident = ici.identity
    tcp = _tcp(packet, ident.family)
    sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", tcp)
    assert (sport, dport) == (ident.local_port, ident.peer_port)
    assert seq_diff(ici.snd_una, seq) == PROBE_BEHIND  # no receive window reaches it
    assert ack == ici.rcv_nxt and flags == 0x10
    header = (off >> 4) * 4
    assert tcp[header:] == b"\0"  # one byte: a data segment is never rate-limited
    options = tcp[20:header]
    if TcpOption.TIMESTAMPS in ici.params.options:
        assert struct.unpack("!BBBBII", options)[4] == tsval
    else:
        assert options == b""
    if ident.family is Family.IPV4:
        pseudo = ident.local_addr + ident.peer_addr + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = ident.local_addr + ident.peer_addr + struct.pack("!I3xB", len(tcp), 6)
    assert checksum(pseudo + tcp) == 0


@given(icis, st.integers(0, 1 << 40), st.integers(-(1 << 20), 1 << 20))
def test_the_peers_ack_names_the_stream_position_to_resume_writing_at(
        ici: Ici, produced: int, delta: int) -> None:
    ack = seq_add(ici.snd_una, delta)
    if produced + delta < 0:
        with pytest.raises(PlanRefused, match="before its start"):
            pin_send_side(ici, produced, ack)
        return
    pinned, position = pin_send_side(ici, produced, ack)
    assert position == produced + delta
    assert pinned == replace(ici, snd_una=ack)


@given(icis)
def test_the_unreachable_message_quotes_the_peers_segment_at_its_snd_una(ici: Ici) -> None:
    msg = unreachable_message(ici)
    ident = ici.identity
    if ident.family is Family.IPV4:
        assert msg[:2] == b"\x03\x01" and checksum(msg) == 0  # host unreachable, summed
        inner, tcp8 = msg[8:28], msg[28:36]
        assert inner[12:16] == ident.peer_addr and inner[16:20] == ident.local_addr
    else:
        assert msg[:2] == b"\x01\x00"  # no route (the kernel sums ICMPv6)
        inner, tcp8 = msg[8:48], msg[48:56]
        assert inner[8:24] == ident.peer_addr and inner[24:40] == ident.local_addr
    assert struct.unpack("!HHI", tcp8) == (ident.peer_port, ident.local_port, ici.rcv_nxt)
