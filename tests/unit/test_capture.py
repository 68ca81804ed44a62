"""ops/capture's pcap reader on packets built here: every field of a TCP segment (addresses,
ports, seq, ack, flags, window, options, payload, ECN, checksum verdict) comes back as built,
over IPv4 and IPv6, from Ethernet, Linux cooked (SLL, SLL2) and raw-IP captures, in pcaps of
either byte order and timestamp precision, fed whole or in any pieces; what is not a TCP
segment (other protocols, fragments, the capture's own flush markers) is skipped."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ops.capture import (
    _MARKER_TAG,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    MARKER_ETHERTYPE,
    PcapError,
    PcapStream,
    Segment,
    marker_nonce,
    parse_frame,
    read_pcap,
)

LINKTYPES = [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW]


def _sum16(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_bytes(s: Segment, *, good_checksum: bool = True) -> bytes:
    assert len(s.options) % 4 == 0
    tcp = struct.pack("!HHIIHHHH", s.sport, s.dport, s.seq, s.ack,
                      ((20 + len(s.options)) // 4) << 12 | s.flags, s.window, 0, 0)
    tcp += s.options + s.payload
    src, dst = ipaddress.ip_address(s.src).packed, ipaddress.ip_address(s.dst).packed
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(tcp), 6)
    csum = 0xFFFF - _sum16(pseudo + tcp)
    if not good_checksum:
        csum ^= 0x5A5A
    return tcp[:16] + struct.pack("!H", csum) + tcp[18:]


def ip_packet(s: Segment, *, good_checksum: bool = True, ext_header: bool = False) -> bytes:
    tcp = tcp_bytes(s, good_checksum=good_checksum)
    src, dst = ipaddress.ip_address(s.src).packed, ipaddress.ip_address(s.dst).packed
    if len(src) == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, s.ecn, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                           src, dst) + tcp
    ext = bytes([6, 0]) + b"\x01\x04\0\0\0\0" if ext_header else b""  # destination options
    return struct.pack("!IHBB16s16s", 0x60000000 | s.ecn << 20, len(ext) + len(tcp),
                       60 if ext_header else 6, 64, src, dst) + ext + tcp


def frame(linktype: int, proto: int, packet: bytes) -> bytes:
    if linktype == LINKTYPE_ETHERNET:
        return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01" + struct.pack("!H", proto) + packet
    if linktype == LINKTYPE_LINUX_SLL:
        return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01", proto) + packet
    if linktype == LINKTYPE_LINUX_SLL2:
        return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, b"\x02\0\0\0\0\x01") + packet
    return packet


def pcap(records: list[tuple[float, bytes, int]], linktype: int, *, big_endian: bool = False,
         nano: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)
    for at, data, wire_len in records:
        sec = int(at)
        frac = round((at - sec) * (1e9 if nano else 1e6))
        out += struct.pack(order + "IIII", sec, frac, len(data), wire_len) + data
    return out


# spelled as the sockets spell them (inet_ntop), as the reader does
_v4 = st.builds(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")),
                st.integers(1, 2**32 - 1))
_v6 = st.builds(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")),
                st.integers(1, 2**128 - 1))
_u32 = st.integers(0, 2**32 - 1)
_port = st.integers(0, 65535)
_options = st.sampled_from([
    b"", b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 9),
    b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + struct.pack("!II", 1, 0) + b"\x01\x03\x03\x07",
    b"\x01\x01\x05\x0a" + struct.pack("!II", 100, 200),
    b"\x01\x01\x05\x12" + struct.pack("!IIII", 1, 2, 3, 4)])


@st.composite
def segments(draw: st.DrawFn, family: int | None = None) -> Segment:
    fam = family or draw(st.sampled_from([4, 6]))
    addr = _v4 if fam == 4 else _v6
    payload = draw(st.binary(max_size=300))
    return Segment(draw(st.integers(0, 2**31).map(lambda n: n / 1e6)), draw(addr), draw(addr),
                   draw(_port), draw(_port), draw(_u32), draw(_u32), draw(st.integers(0, 255)),
                   draw(_port), draw(_options), payload, len(payload), draw(st.integers(0, 3)),
                   True)


@given(segments(), st.sampled_from(LINKTYPES))
def test_a_built_segment_parses_back_field_for_field(s: Segment, linktype: int) -> None:
    packet = ip_packet(s)
    proto = 0x0800 if s.family == 4 else 0x86DD
    assert parse_frame(frame(linktype, proto, packet), linktype, s.at) == s


@given(segments(family=6))
def test_ipv6_extension_headers_are_skipped(s: Segment) -> None:
    assert parse_frame(frame(LINKTYPE_ETHERNET, 0x86DD, ip_packet(s, ext_header=True)),
                       at=s.at) == s


@given(segments(), st.integers(0, 300))
def test_a_truncated_capture_keeps_the_real_length_and_gives_no_checksum_verdict(
        s: Segment, cut: int) -> None:
    whole = frame(LINKTYPE_ETHERNET, 0x0800 if s.family == 4 else 0x86DD, ip_packet(s))
    kept = whole[:max(len(whole) - cut, len(whole) - len(s.payload))]
    got = parse_frame(kept, LINKTYPE_ETHERNET, s.at, wire_len=len(whole))
    assert got is not None
    assert got.payload_len == len(s.payload) and s.payload.startswith(got.payload)
    assert got.checksum_ok is (True if len(kept) == len(whole) else None)


@given(segments())
def test_a_wrong_checksum_is_reported(s: Segment) -> None:
    packet = ip_packet(s, good_checksum=False)
    got = parse_frame(frame(LINKTYPE_ETHERNET, 0x0800 if s.family == 4 else 0x86DD, packet))
    assert got is not None and got.checksum_ok is False


@given(st.lists(st.tuples(segments(), st.booleans()), max_size=8), st.sampled_from(LINKTYPES),
       st.booleans(), st.booleans(), st.data())
def test_a_pcap_read_whole_or_in_pieces_gives_every_segment_in_order(
        items: list[tuple[Segment, bool]], linktype: int, big_endian: bool, nano: bool,
        data: st.DataObject) -> None:
    records = []
    for s, with_noise in items:
        packet = ip_packet(s)
        records.append((s.at, frame(linktype, 0x0800 if s.family == 4 else 0x86DD, packet),
                        len(frame(linktype, 0x0800 if s.family == 4 else 0x86DD, packet))))
        if with_noise and linktype != LINKTYPE_RAW:  # an ARP frame and a flush marker
            arp = frame(linktype, 0x0806, b"\0" * 28)
            marker = frame(linktype, MARKER_ETHERTYPE, _MARKER_TAG + b"n" * 16)
            records += [(s.at, arp, len(arp)), (s.at, marker, len(marker))]
    raw = pcap(records, linktype, big_endian=big_endian, nano=nano)
    want = [(s.at, s) for s, _ in items]
    got = read_pcap(raw)
    assert [g.at for g in got] == pytest.approx([a for a, _ in want], abs=1e-6)
    assert [dataclasses.replace(g, at=0) for g in got] == \
        [dataclasses.replace(s, at=0) for _, s in want]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    stream, pieces = PcapStream(), []
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        pieces += stream.feed(raw[a:b])
    assert stream.pending == 0
    assert stream.segments(pieces) == got


def test_segment_fields_read_from_the_options() -> None:
    opts = (b"\x01\x01\x08\x0a" + struct.pack("!II", 70, 90) + b"\x01\x01\x05\x0a"
            + struct.pack("!II", 100, 200) + b"\x01\x03\x03\x07")
    s = Segment(0.0, "10.0.0.1", "10.0.0.2", 1, 2, 2**32 - 1, 5, 0x13, 9, opts, b"", 3)
    assert (s.tsval, s.tsecr, s.timestamps) == (70, 90, (70, 90))
    assert s.sack == ((100, 200),) and s.wscale == 7 and s.option_kinds == {8, 5, 3}
    assert s.end_seq == 4 and s.is_ack and s.family == 4  # 3 bytes + SYN + FIN, wrapped
    bare = Segment(0.0, "fd00::1", "fd00::2", 1, 2, 0, 0, 0, 0, b"", b"", 0)
    assert (bare.tsval, bare.sack, bare.wscale, bare.family) == (None, (), None, 6)


def test_fragments_other_protocols_and_short_frames_are_not_segments() -> None:
    s = Segment(0.0, "10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 0x10, 5, b"", b"abc", 3, 0, True)
    packet = bytearray(ip_packet(s))
    assert parse_frame(frame(LINKTYPE_ETHERNET, 0x0800, bytes(packet))) == s
    packet[6:8] = struct.pack("!H", 0x2000)  # more fragments follow
    assert parse_frame(frame(LINKTYPE_ETHERNET, 0x0800, bytes(packet))) is None
    packet[6:8], packet[9] = b"\0\0", 17  # UDP
    assert parse_frame(frame(LINKTYPE_ETHERNET, 0x0800, bytes(packet))) is None
    assert parse_frame(b"\0" * 10) is None
    assert parse_frame(frame(LINKTYPE_ETHERNET, 0x0800, ip_packet(s)[:30])) is None


def test_the_flush_marker_is_recognised_by_its_tag() -> None:
    marker = frame(LINKTYPE_ETHERNET, MARKER_ETHERTYPE, (_MARKER_TAG + b"k" * 16).ljust(46, b"\0"))
    assert marker_nonce(marker, LINKTYPE_ETHERNET) == b"k" * 16
    assert marker_nonce(frame(LINKTYPE_ETHERNET, MARKER_ETHERTYPE, b"other"), 1) is None
    assert parse_frame(marker) is None


def test_what_is_not_a_pcap_is_refused_with_what_came() -> None:
    with pytest.raises(PcapError, match="pcapng"):
        read_pcap(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)
    with pytest.raises(PcapError, match="24 bytes, got 3"):
        read_pcap(b"abc")
    with pytest.raises(PcapError, match="link type"):
        read_pcap(pcap([(0.0, b"x" * 20, 20)], 105))
