"""Property tests of the ICI model and its portable codec: round trip, and refusal of bad bytes."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.codec import MAGIC, VERSION, IciDecodeError, decode, encode
from kernel.errors import KernelError
from kernel.ici import (
    Family,
    Ici,
    IciInvalid,
    Identity,
    Params,
    SockOpts,
    TcpOption,
    TcpState,
    Timestamp,
    Window,
    clock_value,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
queue = st.binary(max_size=300)


@st.composite
def identities(draw: st.DrawFn) -> Identity:
    family = draw(st.sampled_from(Family))
    addr = st.binary(min_size=family.addr_len, max_size=family.addr_len)
    return Identity(family, draw(addr), draw(u16), draw(addr), draw(u16))


icis = st.builds(
    Ici,
    identity=identities(),
    state=st.sampled_from(TcpState),
    params=st.builds(Params, mss_clamp=u16, snd_wscale=st.integers(0, 255),
                     rcv_wscale=st.integers(0, 255),
                     options=st.builds(TcpOption, st.integers(0, 15))),
    snd_una=u32,
    rcv_nxt=u32,
    window=st.builds(Window, u32, u32, u32, u32, u32),
    timestamp=st.builds(Timestamp, u32, st.integers(0, (1 << 64) - 1)),
    sent=queue,
    unsent=queue,
    received=queue,
    sockopts=st.builds(SockOpts, st.booleans(), st.booleans(), u32, u32, u32, u32, u32,
                       st.integers(0, 3)),
    fin_sent=st.booleans(),
)


@given(icis)
def test_every_ici_decodes_to_itself(ici: Ici) -> None:
    assert decode(encode(ici)) == ici


@given(icis)
def test_derived_sequence_numbers_follow_the_queues_and_count_each_fin_once(ici: Ici) -> None:
    """As the kernel's SIOCOUTQ/SIOCOUTQNSD/SIOCINQ see them: our FIN is in write_seq - snd_una
    until acked and in write_seq - snd_nxt until sent; the peer's FIN is in rcv_nxt only."""
    fin_queued = ici.our_fin and not ici.fin_acked
    fin_unsent = ici.our_fin and not ici.fin_sent
    assert (ici.write_seq - ici.snd_una) % 2**32 == (
        len(ici.sent) + len(ici.unsent) + fin_queued) % 2**32
    assert (ici.write_seq - ici.snd_nxt) % 2**32 == len(ici.unsent) + fin_unsent
    assert (ici.rcv_nxt - ici.rcv_queue_seq) % 2**32 == len(ici.received) + ici.peer_fin
    assert ici.snd_queue_seq == (ici.snd_una - ici.fin_acked) % 2**32


@pytest.mark.parametrize(("field", "offset", "value", "message"), [
    ("FIN flags", 0, 2, "ICI field FIN flags: expected bits within 0x1, got 2"),
    ("buffer locks", 1, 4, "ICI field buffer locks: expected bits within 0x3, got 4"),
])
def test_unknown_bits_in_the_new_version_2_fields_are_refused_by_name(
    field: str, offset: int, value: int, message: str,
) -> None:
    ici = Ici(Identity(Family.IPV4, bytes(4), 1, bytes(4), 2), TcpState.ESTABLISHED,
              Params(1460, 7, 7, TcpOption(0)), 1, 2, Window(0, 0, 0, 0, 0), Timestamp(0, 0))
    raw = bytearray(encode(ici))
    # FIN flags right after snd_una/rcv_nxt; buffer locks right after the socket option flags
    pos = {"FIN flags": 12 + 6 + 8 + 6 + 8, "buffer locks": 12 + 6 + 8 + 6 + 9 + 20 + 12 + 1}
    raw[pos[field]] = value
    raw[-4:] = struct.pack("!I", zlib.crc32(raw[:-4]))
    with pytest.raises(IciDecodeError, match=message):
        decode(bytes(raw))
    assert VERSION == 2


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_the_decode_error(data: bytes) -> None:
    with pytest.raises(IciDecodeError):
        decode(data)


@given(st.binary(max_size=400))
def test_random_body_with_a_valid_header_and_checksum_raises_only_the_decode_error(
    body: bytes,
) -> None:
    head = struct.pack("!4sHHI", MAGIC, VERSION, 0, 12 + len(body) + 4)
    data = head + body + struct.pack("!I", zlib.crc32(head + body))
    try:
        ici = decode(data)
    except IciDecodeError:
        return
    assert encode(ici) == data


@settings(max_examples=200)
@given(icis, st.data())
def test_a_changed_byte_is_refused(ici: Ici, data: st.DataObject) -> None:
    raw = bytearray(encode(ici))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(IciDecodeError):
        decode(bytes(raw))


@given(icis, st.data())
def test_truncated_bytes_are_refused(ici: Ici, data: st.DataObject) -> None:
    raw = encode(ici)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(IciDecodeError):
        decode(raw[:cut])


@given(icis, st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_refused(ici: Ici, extra: bytes) -> None:
    with pytest.raises(IciDecodeError):
        decode(encode(ici) + extra)


def _resealed(raw: bytes, offset: int, value: bytes) -> bytes:
    b = bytearray(raw[:-4])
    b[offset : offset + len(value)] = value
    return bytes(b) + struct.pack("!I", zlib.crc32(bytes(b)))


@given(icis)
def test_an_unknown_version_is_refused_naming_the_version(ici: Ici) -> None:
    """Version 1 (no FIN flags, no buffer locks) is refused as any other foreign version."""
    with pytest.raises(IciDecodeError, match="version: expected 2, got 1") as err:
        decode(_resealed(encode(ici), 4, struct.pack("!H", 1)))
    assert err.value.field == "version"


@given(icis)
def test_an_unknown_family_is_refused_naming_the_family(ici: Ici) -> None:
    with pytest.raises(IciDecodeError, match="family: expected 4 or 6, got 5"):
        decode(_resealed(encode(ici), 12, b"\x05"))


def test_an_oversized_queue_length_is_refused_before_reading_it() -> None:
    ici = Ici(
        identity=Identity(Family.IPV4, b"\x0a\x00\x00\x01", 80, b"\x0a\x00\x00\x02", 5000),
        state=TcpState.ESTABLISHED,
        params=Params(1460, 7, 7, TcpOption.WSCALE),
        snd_una=1,
        rcv_nxt=2,
        window=Window(2, 100, 100, 100, 2),
        timestamp=Timestamp(0, 0),
    )
    raw = encode(ici)
    sent_len_at = len(raw) - 4 - 12
    with pytest.raises(IciDecodeError, match="sent queue length: expected at most"):
        decode(_resealed(raw, sent_len_at, struct.pack("!I", 0xFFFFFFFF)))


def test_decode_error_and_invalid_values_are_kernel_errors() -> None:
    assert issubclass(IciDecodeError, KernelError)
    with pytest.raises(IciInvalid, match="local_addr: expected 4 bytes for IPV4"):
        Identity(Family.IPV4, b"\x00" * 16, 1, b"\x00" * 4, 2)


def test_timestamp_estimate_adds_elapsed_time_and_margin_and_wraps() -> None:
    ts = Timestamp(tsval=0xFFFFFFF0, read_at_ms=1_000)
    assert ts.estimate(now_ms=1_030, margin_ms=100) == (0xFFFFFFF0 + 130) % 2**32
    assert ts.estimate(now_ms=900, margin_ms=4) == 0xFFFFFFF4
    assert ts.estimate(now_ms=1_000, margin_ms=15) == 0  # 0xFFFFFFFF rounded up: wraps


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**40), st.integers(0, 10**7),
       st.integers(-(10**5), 10**5))
def test_timestamp_estimate_keeps_the_clock_mode_and_unit(
    raw: int, read_at: int, elapsed: int, margin: int,
) -> None:
    """The low bit of TCP_TIMESTAMP is the clock's mode (set: microseconds): an estimate
    keeps it, and advances by elapsed + margin in that unit, rounding up by at most 1."""
    ts = Timestamp(raw, read_at)
    est = ts.estimate(now_ms=read_at + elapsed, margin_ms=margin)
    assert est & 1 == raw & 1 == int(ts.usec)
    unit = 1000 if ts.usec else 1
    assert (est - raw - (elapsed + margin) * unit) % 2**32 in (0, 1)


@given(st.integers(0, 2**32 - 1), st.booleans())
def test_clock_value_sets_the_mode_bit_without_going_backwards(tsval: int, usec: bool) -> None:
    value = clock_value(tsval, usec)
    assert value & 1 == int(usec)
    assert (value - tsval) % 2**32 in (0, 1)


@given(icis, st.sampled_from([0x10, 0x11]), u32, u32)
def test_a_replayed_peer_segment_is_a_valid_tcp_segment_from_the_peer(
    ici: Ici, flags: int, seq: int, ack: int,
) -> None:
    """kernel.repair replays the peer's FIN or ACK as the segment the peer sent: addresses and
    ports swapped, the peer's window in its own scale, a correct checksum (loopback would not
    check it, a capture or another path would)."""
    from kernel.repair import _segment
    from ops.capture import tcp_checksum_ok

    _, packet, dst = _segment(ici, flags, seq, ack)
    ident = ici.identity
    assert dst == str(ident.local_ip)
    ip_len = 20 if ident.family is Family.IPV4 else 40
    src_at, dst_at = (12, 16) if ident.family is Family.IPV4 else (8, 24)
    alen = ident.family.addr_len
    assert packet[src_at : src_at + alen] == ident.peer_addr
    assert packet[dst_at : dst_at + alen] == ident.local_addr
    tcp = packet[ip_len:]
    sport, dport, s, a, off, fl, win = struct.unpack_from("!HHIIBBH", tcp)
    assert (sport, dport, s, a, off >> 4, fl) == (ident.peer_port, ident.local_port, seq, ack,
                                                  5, flags)
    scale = ici.params.snd_wscale
    assert win == min(0xFFFF, -(-ici.window.snd_wnd >> scale))
    assert tcp_checksum_ok(ident.peer_addr, ident.local_addr, tcp)
