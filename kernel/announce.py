"""Address take-over announcements: gratuitous ARP (IPv4) and unsolicited neighbour
advertisement (IPv6), so the neighbours on a link learn that an address moved to this host.

`garp_frame` and `unsolicited_na` build the bytes (pure); `send_garp` and `send_na` send them
from the calling thread's network namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
_BROADCAST = b"\xff" * 6
_ALL_NODES = "ff02::1"
_ND_NA = 136
_NA_FLAG_OVERRIDE = 0x20000000
_OPT_TARGET_LLADDR = 2


def mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"expected a 6-byte MAC address like 02:00:00:00:00:01, got {mac!r}")
    return raw


def garp_frame(mac: str, address: str) -> bytes:
    """An Ethernet broadcast ARP request announcing `address` at `mac` (sender IP = target IP)."""
    hw = mac_bytes(mac)
    ip = ipaddress.IPv4Address(address).packed
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, ip, b"\x00" * 6, ip)
    return _BROADCAST + hw + struct.pack("!H", ETH_P_ARP) + arp


def unsolicited_na(mac: str, address: str) -> bytes:
    """ICMPv6 neighbour advertisement body (checksum left for the kernel), override flag set."""
    target = ipaddress.IPv6Address(address).packed
    option = struct.pack("!BB6s", _OPT_TARGET_LLADDR, 1, mac_bytes(mac))
    return struct.pack("!BBHI16s", _ND_NA, 0, 0, _NA_FLAG_OVERRIDE, target) + option


def send_garp(ifname: str, mac: str, address: str, count: int = 2) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, ETH_P_ARP))
        frame = garp_frame(mac, address)
        for _ in range(count):
            s.send(frame)


def send_na(ifname: str, mac: str, address: str, count: int = 2) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(ifname))
        body = unsolicited_na(mac, address)
        for _ in range(count):
            s.sendto(body, (_ALL_NODES, 0, 0, socket.if_nametoindex(ifname)))
