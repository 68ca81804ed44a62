"""Gratuitous ARP and unsolicited NA frames carry the address and MAC they announce."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.announce import garp_frame, mac_bytes, unsolicited_na

macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


@given(macs, st.ip_addresses(v=4))
def test_garp_announces_the_address_at_the_mac_to_everyone(
        mac: str, addr: ipaddress.IPv4Address) -> None:
    frame = garp_frame(mac, str(addr))
    assert frame[:6] == b"\xff" * 6
    assert frame[6:12] == mac_bytes(mac)
    assert struct.unpack("!H", frame[12:14])[0] == 0x0806
    fields = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    htype, ptype, hlen, plen, oper, sha, spa, _tha, tpa = fields
    assert (htype, ptype, hlen, plen, oper) == (1, 0x0800, 6, 4, 1)
    assert sha == mac_bytes(mac)
    assert spa == tpa == addr.packed


@given(macs, st.ip_addresses(v=6))
def test_unsolicited_na_overrides_and_names_target_and_lladdr(
        mac: str, addr: ipaddress.IPv6Address) -> None:
    body = unsolicited_na(mac, str(addr))
    typ, code, _csum, flags = struct.unpack("!BBHI", body[:8])
    assert (typ, code) == (136, 0)
    assert flags & 0x20000000 and not flags & 0x40000000  # override, not solicited
    assert body[8:24] == addr.packed
    assert body[24:26] == b"\x02\x01" and body[26:32] == mac_bytes(mac)


@pytest.mark.parametrize("bad", ["", "02:00", "zz:00:00:00:00:00", "02:00:00:00:00:00:00"])
def test_malformed_mac_is_refused_with_the_expected_form(bad: str) -> None:
    with pytest.raises(ValueError, match="6-byte MAC"):
        mac_bytes(bad)
