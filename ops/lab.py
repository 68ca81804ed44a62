"""The network-namespace lab: peer, gateway, origin, standby and store hosts on one machine.

    peer ──eth0───v-peer── gw ──br0──┬─p-origin──eth0── origin   (answers the service address)
     10.77.1.2        10.77.1.1      ├─p-standby─eth0── standby
     fd77:1::2        10.77.2.1      ├─p-store───eth0── store    (store2, store3 optional)
                      fd77:2::1      ...

Every host is a network namespace named `<prefix>-<host>`; two labs with different prefixes
run side by side. Links are veth pairs at MTU 1500, dual stack. The service address
(10.77.9.1, fd77:9::1) starts on origin and the gateway routes it there.

Failures are injected outside the victim: `crash` drops all of a host's frames on the gateway's
bridge port (both directions) and then SIGKILLs every process in the host, so the host's TCP
stack sees no error and keeps its sockets; `partition` drops IP traffic between a host and some
others at the same ports; `heal` undoes both. Traffic moves to another host by gateway route
(`switch_route`, the paper's method) or by moving the address and announcing it
(`move_address`: gratuitous ARP and unsolicited neighbour advertisement). Single connections
move by per-connection policy rules on the gateway (`switch_flows`): a rule matching the
connection's 4-tuple looks up the destination host's own routing table, which sends the service
address there; every other connection, and every new one, follows the main route.

Each lab is recorded in /run/tcpcp-lab/<prefix>.json with its owner process; a lab whose owner
died (even by SIGKILL) is removed by the next lab that starts, and a lab's own leftovers of the
same prefix are removed before it is built.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from pyroute2 import IPRoute

from kernel import announce
from kernel.ici import Identity
from ops import labfilter, netns

log = structlog.get_logger(component="tcpcp.lab")

REGISTRY_DIR = "/run/tcpcp-lab"
_TC_H_CLSACT = 0xFFFFFFF1
_INGRESS = 0xFFFFFFF2
_EGRESS = 0xFFFFFFF3
_AUTO_PREFIX = re.compile(r"^tcpcp-(\d+)-\d+$")
_counter = itertools.count(1)

CLIENT_V4, CLIENT_V6 = "10.77.1.", "fd77:1::"
SERVER_V4, SERVER_V6 = "10.77.2.", "fd77:2::"
SERVICE_V4, SERVICE_V6 = "10.77.9.1", "fd77:9::1"
SERVER_HOSTS = {"origin": 10, "standby": 11, "store": 20, "store2": 21, "store3": 22}
# per-connection switch: one routing table per destination host (FLOW_TABLE_BASE + its number),
# rules at one of two priorities (a replacing rule takes the other, see switch_flows)
FLOW_TABLE_BASE = 1000
FLOW_RULE_PRIORITIES = (1000, 1001)

T = TypeVar("T")


_RTAX_RTO_MIN = 13  # rtnetlink route metric


class LabError(RuntimeError):
    """The lab could not be built, changed or found."""


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    netns: str
    v4: str
    v6: str
    mac: str
    gw_port: str | None  # the gateway's interface facing this host (None for gw itself)


@dataclass(frozen=True, slots=True, order=True)
class FlowSwitch:
    """One TCP connection as the gateway sees it: the peer's side and the service's side.

    Written `PEER_IP:PORT>SERVICE_IP:PORT` (IPv6 in brackets), as `parse` reads and str() writes.
    """

    peer_ip: str
    peer_port: int
    service_ip: str
    service_port: int

    def __post_init__(self) -> None:
        try:
            peer = ipaddress.ip_address(self.peer_ip)
            service = ipaddress.ip_address(self.service_ip)
        except ValueError as exc:
            raise LabError(f"flow {self.peer_ip}:{self.peer_port}>{self.service_ip}:"
                           f"{self.service_port}: {exc}") from None
        if peer.version != service.version:
            raise LabError(f"flow {self}: peer and service addresses of different families")
        for name in ("peer_port", "service_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise LabError(f"flow {self.peer_ip}>{self.service_ip}: {name} must be "
                               f"1-65535, got {port!r}")
        object.__setattr__(self, "peer_ip", str(peer))  # one spelling per address
        object.__setattr__(self, "service_ip", str(service))

    @property
    def family(self) -> int:
        return 6 if ":" in self.peer_ip else 4

    def __str__(self) -> str:
        def end(ip: str, port: int) -> str:
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

        return f"{end(self.peer_ip, self.peer_port)}>{end(self.service_ip, self.service_port)}"

    @classmethod
    def parse(cls, text: str) -> FlowSwitch:
        """`10.77.1.2:40000>10.77.9.1:8080` or `[fd77:1::2]:40000>[fd77:9::1]:8080`."""
        m = re.fullmatch(r"\s*(\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+)\s*>\s*"
                         r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+)\s*", text)
        if not m:
            raise LabError(f"expected a flow as PEER_IP:PORT>SERVICE_IP:PORT (IPv6 in brackets), "
                           f"got {text!r}")
        return cls(m[1].strip("[]"), int(m[2]), m[3].strip("[]"), int(m[4]))

    @classmethod
    def of(cls, flow: FlowSwitch | Identity) -> FlowSwitch:
        """A FlowSwitch as is, or a kernel.ici.Identity taken on the service's host (its local
        side is the service, its peer side the peer)."""
        if isinstance(flow, FlowSwitch):
            return flow
        return cls(str(flow.peer_ip), flow.peer_port, str(flow.local_ip), flow.local_port)


@dataclass(frozen=True, slots=True)
class _FlowRule:
    table: int
    priority: int


@dataclass(slots=True)
class _PortRules:
    cut: bool = False
    drop_dst: set[str] = field(default_factory=set)  # ingress at gw: frames from the host to...
    drop_src: set[str] = field(default_factory=set)  # egress at gw: frames to the host from...


# ---------------------------------------------------------------- netlink for flow rules
# pyroute2 waits for each request's answer (~0.85 ms a rule); a switch of 1,000 connections is
# sent as a few batches of raw rtnetlink messages instead (linux/netlink.h, linux/fib_rules.h,
# linux/rtnetlink.h), processed by the kernel within each sendmsg.
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLA_HDR = struct.Struct("=HH")  # len, type
# fib_rule_hdr: family dst_len src_len tos table res1 res2 action flags
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_RTM_NEWRULE, _RTM_DELRULE, _RTM_GETRULE = 32, 33, 34
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLM_F_EXCL, _NLM_F_CREATE = 0x200, 0x400
_FR_ACT_TO_TBL = 1
_FRA_DST, _FRA_SRC, _FRA_PRIORITY, _FRA_TABLE = 1, 2, 6, 15
_FRA_IP_PROTO, _FRA_SPORT_RANGE, _FRA_DPORT_RANGE = 22, 23, 24
_RTA_DST, _RTA_SRC, _RTA_IIF, _RTA_GATEWAY = 1, 2, 3, 5
_RTA_IP_PROTO, _RTA_SPORT, _RTA_DPORT = 27, 28, 29
_NETLINK_CAP_ACK = 10
_BATCH = 256  # messages per sendmsg


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA_HDR.size + len(payload)
    return _NLA_HDR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _nla_walk(data: bytes, offset: int) -> dict[int, bytes]:
    attrs = {}
    while offset + _NLA_HDR.size <= len(data):
        size, kind = _NLA_HDR.unpack_from(data, offset)
        if size < _NLA_HDR.size:
            break
        attrs[kind & 0x3FFF] = data[offset + _NLA_HDR.size : offset + size]
        offset += (size + 3) & ~3
    return attrs


def _af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _rule_body(flow: FlowSwitch, rule: _FlowRule) -> bytes:
    """fib_rule_hdr and attributes of the rule that sends `flow` to `rule.table`."""
    plen = 32 if flow.family == 4 else 128
    port_range = struct.Struct("=HH")
    return (_FIB_RULE_HDR.pack(_af(flow.family), plen, plen, 0, 0, 0, 0, _FR_ACT_TO_TBL, 0)
            + _nla(_FRA_SRC, ipaddress.ip_address(flow.peer_ip).packed)
            + _nla(_FRA_DST, ipaddress.ip_address(flow.service_ip).packed)
            + _nla(_FRA_PRIORITY, struct.pack("=I", rule.priority))
            + _nla(_FRA_TABLE, struct.pack("=I", rule.table))
            + _nla(_FRA_IP_PROTO, bytes([socket.IPPROTO_TCP]))
            + _nla(_FRA_SPORT_RANGE, port_range.pack(flow.peer_port, flow.peer_port))
            + _nla(_FRA_DPORT_RANGE, port_range.pack(flow.service_port, flow.service_port)))


def _flow_of_rule(family: int, body: bytes) -> tuple[FlowSwitch, _FlowRule] | None:
    """The flow and rule a dumped fib rule is, if it is one of switch_flows' rules."""
    fam, dst_len, src_len, _tos, table, _r1, _r2, action, _fl = _FIB_RULE_HDR.unpack_from(body)
    plen = 32 if family == socket.AF_INET else 128
    if fam != family or (dst_len, src_len, action) != (plen, plen, _FR_ACT_TO_TBL):
        return None
    a = _nla_walk(body, _FIB_RULE_HDR.size)
    table = struct.unpack("=I", a[_FRA_TABLE])[0] if _FRA_TABLE in a else table
    if not {_FRA_SRC, _FRA_DST, _FRA_PRIORITY, _FRA_SPORT_RANGE, _FRA_DPORT_RANGE} <= a.keys():
        return None
    prio = struct.unpack("=I", a[_FRA_PRIORITY])[0]
    if prio not in FLOW_RULE_PRIORITIES or table - FLOW_TABLE_BASE not in SERVER_HOSTS.values():
        return None
    if a.get(_FRA_IP_PROTO) != bytes([socket.IPPROTO_TCP]):
        return None
    sport, sport_end = struct.unpack("=HH", a[_FRA_SPORT_RANGE])
    dport, dport_end = struct.unpack("=HH", a[_FRA_DPORT_RANGE])
    if sport != sport_end or dport != dport_end:
        return None
    flow = FlowSwitch(str(ipaddress.ip_address(a[_FRA_SRC])), sport,
                      str(ipaddress.ip_address(a[_FRA_DST])), dport)
    return flow, _FlowRule(table, prio)


class _RuleSocket:
    """A raw rtnetlink socket inside one namespace, for batches of rule requests."""

    def __init__(self, netns_name: str) -> None:
        with netns.entered(netns_name):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.sock.setsockopt(270, _NETLINK_CAP_ACK, 1)  # SOL_NETLINK: acks without the request
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: dumps, errors
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        self._seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def _receive(self, until_seq: int, on_message: Callable[[int, int, bytes], None]) -> None:
        """Read answers up to the ACK, DONE or error of `until_seq`; each other message goes
        to on_message(type, seq, body). An error message with errno 0 is an ACK."""
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSG_HDR.size <= len(data):
                size, kind, _flags, seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
                body = data[offset + _NLMSG_HDR.size : offset + size]
                offset += (size + 3) & ~3
                on_message(kind, seq, body)
                if seq == until_seq and kind in (_NLMSG_ERROR, _NLMSG_DONE):
                    return

    def batch(self, kind: int, bodies: Sequence[bytes], flags: int) -> list[tuple[int, int]]:
        """Send requests in batches; only a batch's last asks for an ACK (the kernel handles a
        batch in order within sendmsg, so that ACK follows every other answer). Returns
        (index, errno) for each request the kernel refused."""
        failed: list[tuple[int, int]] = []
        for start in range(0, len(bodies), _BATCH):
            chunk = bodies[start : start + _BATCH]
            seqs = [next(self._seq) for _ in chunk]
            index = {seq: start + i for i, seq in enumerate(seqs)}
            out = bytearray()
            for i, (seq, body) in enumerate(zip(seqs, chunk, strict=True)):
                ack = _NLM_F_ACK if i == len(chunk) - 1 else 0
                out += _NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), kind,
                                       _NLM_F_REQUEST | flags | ack, seq, 0) + body

            def on_message(msg_kind: int, seq: int, body: bytes,
                           index: dict[int, int] = index) -> None:
                if msg_kind == _NLMSG_ERROR and seq in index:
                    err = -struct.unpack_from("=i", body)[0]
                    if err:
                        failed.append((index[seq], err))

            self.sock.sendall(bytes(out))
            self._receive(seqs[-1], on_message)
        return failed

    def request(self, kind: int, body: bytes, flags: int = 0) -> list[tuple[int, bytes]]:
        """One request (a dump with _NLM_F_DUMP); its answers as (type, body). Raises OSError
        for an error answer."""
        seq = next(self._seq)
        answers: list[tuple[int, bytes]] = []
        error: list[int] = []

        def on_message(msg_kind: int, msg_seq: int, msg_body: bytes) -> None:
            if msg_seq != seq:
                return
            if msg_kind == _NLMSG_ERROR:
                err = -struct.unpack_from("=i", msg_body)[0]
                if err:
                    error.append(err)
            elif msg_kind != _NLMSG_DONE:
                answers.append((msg_kind, msg_body))

        ack = 0 if flags & _NLM_F_DUMP else _NLM_F_ACK  # a dump ends with DONE instead
        self.sock.sendall(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), kind,
                                          _NLM_F_REQUEST | flags | ack, seq, 0) + body)
        self._receive(seq, on_message)
        if error:
            raise OSError(error[0], os.strerror(error[0]))
        return answers


def _auto_prefix() -> str:
    return f"tcpcp-{os.getpid()}-{next(_counter)}"


class Lab:
    """The lab as a context manager: `with Lab() as lab: ...` builds it and always removes it."""

    def __init__(self, prefix: str | None = None, stores: int = 1, owned: bool = True) -> None:
        if not 1 <= stores <= 3:
            raise LabError(f"stores must be 1, 2 or 3, got {stores}")
        self.prefix = prefix or _auto_prefix()
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,20}", self.prefix):
            raise LabError(f"prefix must be 1-21 of [a-z0-9-] starting with a letter, got "
                           f"{self.prefix!r}")
        self.owned = owned
        # the process whose death makes this lab stale (None: lives until `tcpcp lab down`)
        self.owner: tuple[int, int | None] | None = (
            (os.getpid(), netns.process_start_time(os.getpid())) if owned else None)
        names = ["peer", "gw", "origin", "standby", "store", "store2", "store3"][: 4 + stores]
        self.hosts: dict[str, Host] = {n: self._host(n) for n in names}
        self.service_owner = "origin"
        self.service_holders: set[str] = {"origin"}
        self.service_mode = "route"
        self._rules: dict[str, _PortRules] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._netlinks: dict[str, IPRoute] = {}
        self._rule_socket: _RuleSocket | None = None  # the gateway's, for flow rule batches
        self._netlink_lock = threading.RLock()
        self._built = False

    # ---------------------------------------------------------------- topology
    def _host(self, name: str) -> Host:
        ns = f"{self.prefix}-{name}"
        if name == "peer":
            return Host(name, ns, CLIENT_V4 + "2", CLIENT_V6 + "2", "02:77:01:00:00:02", "v-peer")
        if name == "gw":
            return Host(name, ns, SERVER_V4 + "1", SERVER_V6 + "1", "02:77:02:00:00:01", None)
        n = SERVER_HOSTS[name]
        return Host(name, ns, SERVER_V4 + str(n), SERVER_V6 + format(n, "x"),
                    f"02:77:02:00:00:{n:02x}", f"p-{name}")

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the lab (removing dead labs and this prefix's leftovers first)."""
        sweep_stale()
        remove_prefix(self.prefix)
        self._save()
        t0 = time.monotonic()
        try:
            for h in self.hosts.values():
                netns.create(h.netns)
                self._base_sysctls(h)
            self._wire()
        except BaseException:
            self.down()
            raise
        self._built = True
        log.info("lab_up", prefix=self.prefix, hosts=list(self.hosts),
                 ms=round((time.monotonic() - t0) * 1000, 1))

    def _base_sysctls(self, h: Host) -> None:
        for key, value in (
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.all.dad_transmits", "0"),
            ("net.ipv6.conf.default.dad_transmits", "0"),
        ):
            netns.sysctl_write(h.netns, key, value)
        if h.name == "gw":
            for key, value in (
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv4.conf.all.arp_accept", "1"),
                ("net.ipv4.conf.default.arp_accept", "1"),
            ):
                netns.sysctl_write(h.netns, key, value)

    def _wire(self) -> None:
        gw = self.hosts["gw"]
        with IPRoute(netns=gw.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0,
                     address=gw.mac)
            br = ipr.link_lookup(ifname="br0")[0]
            for h in self.hosts.values():
                if h.gw_port is not None:
                    self._plug(ipr, br, h)
            ipr.addr("add", index=br, address=gw.v4, prefixlen=24)
            ipr.addr("add", index=br, address=gw.v6, prefixlen=64)
            ipr.link("set", index=br, state="up")
        for h in self.hosts.values():
            if h.name != "gw":
                self._configure(h)
        self._route_service_via("origin")
        for h in self.hosts.values():
            ports = [x.gw_port for x in self.hosts.values() if x.gw_port] if h.name == "gw" \
                else ["eth0"]
            netns.steer_flows(h.netns, [p for p in ports if p])
        # accept a gratuitous ARP at once, however recently the entry was updated
        netns.sysctl_write(gw.netns, "net.ipv4.neigh.br0.locktime", "0")

    def _plug(self, ipr: IPRoute, br: int, h: Host) -> None:
        """The gateway's side of h's cable: the veth pair, its far end moved into h."""
        assert h.gw_port is not None
        ipr.link("add", ifname=h.gw_port, kind="veth",
                 peer={"ifname": "eth0", "net_ns_fd": h.netns, "address": h.mac})
        port = ipr.link_lookup(ifname=h.gw_port)[0]
        if h.name == "peer":
            ipr.addr("add", index=port, address=CLIENT_V4 + "1", prefixlen=24)
            ipr.addr("add", index=port, address=CLIENT_V6 + "1", prefixlen=64)
        else:
            ipr.link("set", index=port, master=br)
        ipr.link("set", index=port, state="up")

    def _configure(self, h: Host) -> None:
        """h's own side: loopback, eth0's addresses, default routes (and the service address
        on the origin at first)."""
        gw = self.hosts["gw"]
        with IPRoute(netns=h.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=h.v4, prefixlen=24)
            ipr.addr("add", index=eth, address=h.v6, prefixlen=64)
            ipr.link("set", index=eth, state="up")
            via4, via6 = ((CLIENT_V4 + "1", CLIENT_V6 + "1") if h.name == "peer"
                          else (gw.v4, gw.v6))
            ipr.route("add", dst="default", gateway=via4)
            ipr.route("add", dst="default", gateway=via6, family=socket.AF_INET6)
            if h.name == "origin" and not self._built:
                self._add_service(ipr, eth)

    def reboot(self, host: str) -> None:
        """Bring a crashed server host back as a freshly booted machine: its namespace (every
        socket, gate, filter and route it had) is destroyed and built again, while it is still
        cut off, so nothing of its old kernel state ever reaches the wire; then the cut is lifted.
        It holds no service address: the traffic stays where it was moved."""
        h = self.host(host)
        if host not in SERVER_HOSTS:
            raise LabError(f"only a server host can be rebooted, not {host!r}")
        if not self._rules.get(h.gw_port or "", _PortRules()).cut:
            raise LabError(f"{host} is running: crash it first (a reboot of a live host "
                           "would reset its peers' connections)")
        with self._lock:
            ex = self._executors.pop(host, None)
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
        with self._netlink_lock:
            ipr_old = self._netlinks.pop(host, None)
            if ipr_old is not None:
                with contextlib.suppress(Exception):
                    ipr_old.close()
        with self._netlink("gw") as ipr:  # the cable first: removing a namespace frees its
            for idx in ipr.link_lookup(ifname=h.gw_port):  # devices only later, in the
                ipr.link("del", index=idx)                   # background
        netns.remove(h.netns)
        netns.create(h.netns)
        self._base_sysctls(h)
        with self._netlink("gw") as ipr:
            self._plug(ipr, ipr.link_lookup(ifname="br0")[0], h)
        self._configure(h)
        netns.steer_flows(h.netns, ["eth0"])
        assert h.gw_port is not None
        netns.steer_flows(self.hosts["gw"].netns, [h.gw_port])
        self.service_holders.discard(host)
        del self._rules[h.gw_port]  # the new gateway port carries no filter: the cut is gone
        log.info("rebooted", host=host)
        self._save()

    @contextlib.contextmanager
    def _netlink(self, host: str) -> Iterator[IPRoute]:
        """A netlink handle inside `host`, opened once (opening one costs ~10 ms), one user at a
        time."""
        with self._netlink_lock:
            ipr = self._netlinks.get(host)
            if ipr is None:
                ipr = self._netlinks[host] = IPRoute(netns=self.netns(host))
            yield ipr

    # ---------------------------------------------------------------- teardown
    def down(self) -> None:
        """Stop everything the lab started and remove its namespaces. Safe to call twice."""
        with self._netlink_lock:
            for ipr in self._netlinks.values():
                with contextlib.suppress(Exception):
                    ipr.close()
            self._netlinks.clear()
            if self._rule_socket is not None:
                self._rule_socket.close()
                self._rule_socket = None
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()
        for p in self._procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._procs.clear()
        remove_prefix(self.prefix)
        self._built = False
        log.info("lab_down", prefix=self.prefix)

    # ---------------------------------------------------------------- queries
    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in this lab; hosts are {sorted(self.hosts)}") \
                from None

    def netns(self, name: str) -> str:
        return self.host(name).netns

    def addr(self, name: str, family: int = 4) -> str:
        h = self.host(name)
        if name == "gw":
            return h.v4 if family == 4 else h.v6
        return h.v4 if family == 4 else h.v6

    def addresses(self, name: str) -> list[str]:
        """Every address of a host (the gateway's on both of its links; service if held)."""
        h = self.host(name)
        out = [h.v4, h.v6]
        if name == "gw":
            out += [CLIENT_V4 + "1", CLIENT_V6 + "1"]
        if name in self.service_holders:
            out += [SERVICE_V4, SERVICE_V6]
        return out

    @staticmethod
    def service(family: int = 4) -> str:
        return SERVICE_V4 if family == 4 else SERVICE_V6

    # ---------------------------------------------------------------- processes
    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside `host`; the lab kills it on teardown (and on crash)."""
        p = netns.popen(self.netns(host), argv, **kwargs)
        self._procs.append(p)
        return p

    def run(self, host: str, argv: Sequence[str],
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a process inside `host` to completion (subprocess.run keyword arguments)."""
        return netns.run(self.netns(host), argv, **kwargs)

    def enter(self, host: str) -> contextlib.AbstractContextManager[None]:
        """The current thread is inside `host` for the block: sockets made there stay there."""
        return netns.entered(self.netns(host))

    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in a thread that lives inside `host` and return its result."""
        return self.submit(host, fn, *args, **kwargs).result()

    def submit(self, host: str, fn: Callable[..., T], *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        """Like `call`, but returns the future (one worker thread per host)."""
        with self._lock:
            ex = self._executors.get(host)
            if ex is None:
                path = netns.path(self.netns(host))
                ex = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix=f"lab-{host}",
                    initializer=netns.join, initargs=(path,))
                self._executors[host] = ex
        return ex.submit(fn, *args, **kwargs)

    def sysctl(self, host: str, key: str, value: str | int) -> None:
        netns.sysctl_write(self.netns(host), key, str(value))

    def sysctl_get(self, host: str, key: str) -> str:
        return netns.sysctl_read(self.netns(host), key)

    @contextlib.contextmanager
    def slow_retransmissions(self, host: str, rto_min_ms: int) -> Iterator[None]:
        """Inside, connections `host` opens wait at least rto_min_ms before retransmitting:
        its default routes carry a locked rto_min metric (the kernel ignores an unlocked one,
        tcp_rto_min in tcp.h), and its tail loss probe is off (tcp_early_retrans 0). For tests
        that hold the other side's ACKs on a loaded machine, where the ordinary timers can fire
        first. A socket keeps the route it connected with: open the connection inside."""
        h = self.host(host)
        via4, via6 = ((CLIENT_V4 + "1", CLIENT_V6 + "1") if h.name == "peer"
                      else (self.hosts["gw"].v4, self.hosts["gw"].v6))
        routes = ((via4, socket.AF_INET), (via6, socket.AF_INET6))
        with self._netlink(host) as ipr:
            for via, af in routes:
                ipr.route("replace", dst="default", gateway=via, family=af,
                          metrics={"rto_min": rto_min_ms, "lock": 1 << _RTAX_RTO_MIN})
        # the tail loss probe fires after two smoothed RTTs whatever rto_min says (a loaded
        # patched guest resent the held bytes that way): off while inside
        early = self.sysctl_get(host, "net.ipv4.tcp_early_retrans")
        self.sysctl(host, "net.ipv4.tcp_early_retrans", 0)
        try:
            yield
        finally:
            self.sysctl(host, "net.ipv4.tcp_early_retrans", early)
            with self._netlink(host) as ipr:
                for via, af in routes:
                    ipr.route("replace", dst="default", gateway=via, family=af)

    def pids(self, host: str) -> list[int]:
        return netns.pids(self.netns(host))

    # ---------------------------------------------------------------- failures
    def crash(self, host: str) -> list[int]:
        """Cut `host` off at the gateway (both directions), then SIGKILL its processes.

        The host's kernel keeps its sockets and sees no error: nothing is done inside it
        except killing processes. Returns the killed pids."""
        h = self.host(host)
        if h.gw_port is None:
            raise LabError("the gateway itself cannot be crashed; crash a host behind it")
        self._rules.setdefault(h.gw_port, _PortRules()).cut = True
        self._apply(h.gw_port)
        killed = netns.kill_all(h.netns)
        for p in self._procs:
            if p.pid in killed:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        log.info("crashed", host=host, killed=len(killed))
        self._save()
        return killed

    def partition(self, host: str, from_hosts: Iterable[str]) -> None:
        """Drop IP traffic between `host` and each of `from_hosts`, at the gateway."""
        others = [self.host(o).name for o in from_hosts]
        self.host(host)
        for other in others:
            if other == host:
                raise LabError(f"cannot partition {host} from itself")
            a, b = (other, host) if host == "gw" else (host, other)
            port = self.hosts[a].gw_port
            assert port is not None
            rules = self._rules.setdefault(port, _PortRules())
            rules.drop_dst.update(self.addresses(b))
            rules.drop_src.update(self.addresses(b))
            self._apply(port)
        log.info("partitioned", host=host, from_hosts=others)
        self._save()

    def heal(self, host: str | None = None) -> None:
        """Remove every cut and partition (or only those on `host`'s gateway port)."""
        ports = list(self._rules) if host is None else [self.host(host).gw_port]
        for port in ports:
            if port is not None and port in self._rules:
                self._rules[port] = _PortRules()
                self._apply(port)
                del self._rules[port]
        log.info("healed", host=host or "all")
        self._save()

    def _apply(self, port: str) -> None:
        rules = self._rules.get(port, _PortRules())
        with self._netlink("gw") as ipr:
            idx = ipr.link_lookup(ifname=port)[0]
            with contextlib.suppress(Exception):
                ipr.tc("del", "clsact", idx)
            if not (rules.cut or rules.drop_dst or rules.drop_src):
                return
            ipr.tc("add", "clsact", idx)
            for parent, prog in (
                (_INGRESS, labfilter.drop_all() if rules.cut
                 else labfilter.drop_addresses(sorted(rules.drop_dst), match="dst")),
                (_EGRESS, labfilter.drop_all() if rules.cut
                 else labfilter.drop_addresses(sorted(rules.drop_src), match="src")),
            ):
                fd = labfilter.load(prog, name="tcpcp_lab_drop")
                try:
                    ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name="tcpcp_lab_drop",
                           parent=parent, classid=1, direct_action=True)
                finally:
                    os.close(fd)

    # ---------------------------------------------------------------- traffic switch
    def _add_service(self, ipr: IPRoute, eth: int) -> None:
        with contextlib.suppress(Exception):
            ipr.addr("add", index=eth, address=SERVICE_V4, prefixlen=32)
        with contextlib.suppress(Exception):
            ipr.addr("add", index=eth, address=SERVICE_V6, prefixlen=128)

    def _hold_service(self, host: str) -> None:
        with self._netlink(host) as ipr:
            self._add_service(ipr, ipr.link_lookup(ifname="eth0")[0])
        self.service_holders.add(host)

    def _release_service(self, host: str) -> None:
        with self._netlink(host) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            for address, plen in ((SERVICE_V4, 32), (SERVICE_V6, 128)):
                with contextlib.suppress(Exception):
                    ipr.addr("del", index=eth, address=address, prefixlen=plen)
        self.service_holders.discard(host)

    def _route_service_via(self, host: str) -> None:
        h = self.host(host)
        with self._netlink("gw") as ipr:
            ipr.route("replace", dst=SERVICE_V4 + "/32", gateway=h.v4)
            ipr.route("replace", dst=SERVICE_V6 + "/128", gateway=h.v6, family=socket.AF_INET6)

    def switch_route(self, host: str) -> None:
        """The gateway routes the service address to `host` (which gets the address too)."""
        if host not in SERVER_HOSTS or host not in self.hosts:
            raise LabError(f"the service can only move to a server host, not {host!r}")
        self._hold_service(host)
        self._route_service_via(host)
        self.service_owner, self.service_mode = host, "route"
        log.info("service_switched", to=host, method="route")
        self._save()

    def move_address(self, host: str, release: bool = True) -> None:
        """Move the service address to `host` and announce it (gratuitous ARP, unsolicited NA).

        The gateway then reaches the address on-link through its bridge. With `release` the
        address is first removed from the other hosts (a crashed host is cut off anyway)."""
        if host not in SERVER_HOSTS or host not in self.hosts:
            raise LabError(f"the service can only move to a server host, not {host!r}")
        if release:
            for other in sorted(self.service_holders - {host}):
                self._release_service(other)
        self._hold_service(host)
        with self._netlink("gw") as ipr:
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.route("replace", dst=SERVICE_V4 + "/32", oif=br, scope=253)
            ipr.route("replace", dst=SERVICE_V6 + "/128", oif=br, family=socket.AF_INET6)
        mac = self.host(host).mac
        self.call(host, announce.send_garp, "eth0", mac, SERVICE_V4)
        self.call(host, announce.send_na, "eth0", mac, SERVICE_V6)
        self.service_owner, self.service_mode = host, "address"
        log.info("service_switched", to=host, method="address")
        self._save()

    # ---------------------------------------------------------------- per-connection switch
    @staticmethod
    def flow_table(host: str) -> int:
        """The gateway's routing table that sends the service address to `host`."""
        return FLOW_TABLE_BASE + SERVER_HOSTS[host]

    def _gw_rules(self) -> _RuleSocket:
        with self._netlink_lock:
            if self._rule_socket is None:
                self._rule_socket = _RuleSocket(self.netns("gw"))
            return self._rule_socket

    def _flow_rules(self) -> dict[FlowSwitch, _FlowRule]:
        """The gateway's flow rules, read from its kernel (the only record of them)."""
        rules: dict[FlowSwitch, _FlowRule] = {}
        with self._netlink_lock:
            nl = self._gw_rules()
            for family in (socket.AF_INET, socket.AF_INET6):
                query = _FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
                for kind, body in nl.request(_RTM_GETRULE, query, _NLM_F_DUMP):
                    found = _flow_of_rule(family, body) if kind == _RTM_NEWRULE else None
                    if found is not None:
                        rules[found[0]] = found[1]
        return rules

    def _flow_requests(self, kind: int, items: Sequence[tuple[FlowSwitch, _FlowRule]]) -> None:
        flags = _NLM_F_CREATE | _NLM_F_EXCL if kind == _RTM_NEWRULE else 0
        harmless = errno.EEXIST if kind == _RTM_NEWRULE else errno.ENOENT
        with self._netlink_lock:
            failed = self._gw_rules().batch(kind, [_rule_body(f, r) for f, r in items], flags)
        failed = [(i, err) for i, err in failed if err != harmless]
        if failed:
            verb = "add" if kind == _RTM_NEWRULE else "remove"
            first = "; ".join(f"{items[i][0]}: {os.strerror(err)}" for i, err in failed[:3])
            raise LabError(f"the gateway refused to {verb} {len(failed)} flow rules ({first})")

    def _flow_list(self, flows: Iterable[FlowSwitch | Identity]) -> list[FlowSwitch]:
        out = list(dict.fromkeys(FlowSwitch.of(f) for f in flows))
        foreign = [f for f in out if f.service_ip not in (SERVICE_V4, SERVICE_V6)]
        if foreign:
            raise LabError(f"expected flows to the service address {SERVICE_V4} or "
                           f"{SERVICE_V6}, got {', '.join(map(str, foreign[:3]))}")
        return out

    def switch_flows(self, flows: Iterable[FlowSwitch | Identity], to_host: str) -> int:
        """The gateway sends these connections (and only these) to `to_host`.

        One policy rule per connection (TCP, peer address and port, service address and port)
        looks up `to_host`'s table, whose route sends the service address there; every other
        connection and every new one keeps following the main route. `to_host` is given the
        service address if it lacks it. A flow switched to another host before is moved: its
        new rule is added before the old one is removed (at the other of the two priorities),
        so no packet of it falls through to the main route meanwhile. Returns how many rules
        were added (flows already at `to_host` need none). Kernel.ici Identity objects are
        taken on the service's side (local = service, peer = peer)."""
        if to_host not in SERVER_HOSTS or to_host not in self.hosts:
            raise LabError(f"flows can only move to a server host, not {to_host!r}")
        wanted = self._flow_list(flows)
        t0 = time.monotonic()
        if to_host not in self.service_holders:
            self._hold_service(to_host)
            self._save()
        h, table = self.host(to_host), self.flow_table(to_host)
        with self._netlink_lock:
            with self._netlink("gw") as ipr:
                ipr.route("replace", dst=SERVICE_V4 + "/32", gateway=h.v4, table=table)
                ipr.route("replace", dst=SERVICE_V6 + "/128", gateway=h.v6,
                          family=socket.AF_INET6, table=table)
            current = self._flow_rules()
            adds, removals = [], []
            for flow in wanted:
                old = current.get(flow)
                if old is not None and old.table == table:
                    continue
                first, second = FLOW_RULE_PRIORITIES
                priority = second if old is not None and old.priority == first else first
                adds.append((flow, _FlowRule(table, priority)))
                if old is not None:
                    removals.append((flow, old))
            self._flow_requests(_RTM_NEWRULE, adds)
            self._flow_requests(_RTM_DELRULE, removals)
        log.info("flows_switched", to=to_host, flows=len(adds), moved=len(removals),
                 ms=round((time.monotonic() - t0) * 1000, 1))
        return len(adds)

    def unswitch_flows(self, flows: Iterable[FlowSwitch | Identity] | None = None
                       ) -> list[FlowSwitch]:
        """Remove these connections' rules (None: every flow rule): they follow the main route
        again. Returns the flows that were switched."""
        t0 = time.monotonic()
        with self._netlink_lock:
            current = self._flow_rules()
            chosen = list(current) if flows is None else self._flow_list(flows)
            removals = [(f, current[f]) for f in chosen if f in current]
            self._flow_requests(_RTM_DELRULE, removals)
        log.info("flows_unswitched", flows=len(removals),
                 ms=round((time.monotonic() - t0) * 1000, 1))
        return [f for f, _ in removals]

    def switched_flows(self) -> dict[str, list[FlowSwitch]]:
        """Every switched connection, by the host it is switched to (read from the gateway)."""
        hosts = {self.flow_table(h): h for h in SERVER_HOSTS}
        out: dict[str, list[FlowSwitch]] = {}
        for flow, rule in self._flow_rules().items():
            out.setdefault(hosts[rule.table], []).append(flow)
        return {h: sorted(fs) for h, fs in sorted(out.items())}

    def route_of(self, flow: FlowSwitch | Identity) -> str | None:
        """The host the gateway forwards this connection's next packet from the peer to (the
        kernel's own route lookup, rules included), or None when it is sent on-link (the
        service address after `move_address`)."""
        f = FlowSwitch.of(flow)
        plen = 32 if f.family == 4 else 128
        with self._netlink_lock:
            with self._netlink("gw") as ipr:
                iif = ipr.link_lookup(ifname="v-peer")[0]
            query = (_RTMSG.pack(_af(f.family), plen, plen, 0, 0, 0, 0, 0, 0)
                     + _nla(_RTA_DST, ipaddress.ip_address(f.service_ip).packed)
                     + _nla(_RTA_SRC, ipaddress.ip_address(f.peer_ip).packed)
                     + _nla(_RTA_IIF, struct.pack("=I", iif))
                     + _nla(_RTA_IP_PROTO, bytes([socket.IPPROTO_TCP]))
                     + _nla(_RTA_SPORT, struct.pack("!H", f.peer_port))
                     + _nla(_RTA_DPORT, struct.pack("!H", f.service_port)))
            answers = self._gw_rules().request(_RTM_GETROUTE, query)
        for kind, body in answers:
            gateway = _nla_walk(body, _RTMSG.size).get(_RTA_GATEWAY) if kind == _RTM_NEWROUTE \
                else None
            if gateway is not None:
                address = str(ipaddress.ip_address(gateway))
                for h in self.hosts.values():
                    if address in (h.v4, h.v6):
                        return h.name
                raise LabError(f"the gateway routes {f} via {address}, which is no lab host")
        return None

    # ---------------------------------------------------------------- registry
    def _save(self) -> None:
        os.makedirs(REGISTRY_DIR, exist_ok=True)
        state = {
            "prefix": self.prefix,
            "hosts": list(self.hosts),
            "owner_pid": self.owner[0] if self.owner else None,
            "owner_start": self.owner[1] if self.owner else None,
            "service_owner": self.service_owner,
            "service_mode": self.service_mode,
            "service_holders": sorted(self.service_holders),
            "rules": {p: {"cut": r.cut, "drop_dst": sorted(r.drop_dst),
                          "drop_src": sorted(r.drop_src)} for p, r in self._rules.items()},
        }
        tmp = _registry_path(self.prefix) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, _registry_path(self.prefix))

    @classmethod
    def attach(cls, prefix: str) -> Lab:
        """A handle on a running lab (made by `tcpcp lab up`), read from its registry file."""
        try:
            with open(_registry_path(prefix)) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise LabError(f"no lab with prefix {prefix!r} is up (no {_registry_path(prefix)})") \
                from None
        lab = cls(prefix, stores=len(state["hosts"]) - 4, owned=False)
        if state["owner_pid"] is not None:  # keep the real owner: attaching does not adopt it
            lab.owner = (state["owner_pid"], state["owner_start"])
        lab.service_owner = state["service_owner"]
        lab.service_mode = state["service_mode"]
        lab.service_holders = set(state["service_holders"])
        for port, r in state["rules"].items():
            lab._rules[port] = _PortRules(r["cut"], set(r["drop_dst"]), set(r["drop_src"]))
        lab._built = True
        return lab

    def status(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "hosts": {n: {"netns": h.netns, "v4": h.v4, "v6": h.v6, "mac": h.mac,
                          "up": netns.exists(h.netns), "processes": len(netns.pids(h.netns))}
                      for n, h in self.hosts.items()},
            "service": {"v4": SERVICE_V4, "v6": SERVICE_V6, "owner": self.service_owner,
                        "mode": self.service_mode},
            "cut": sorted(p for p, r in self._rules.items() if r.cut),
            "partitions": {p: sorted(r.drop_dst) for p, r in self._rules.items() if r.drop_dst},
            "switched_flows": self._switched_counts(),
        }

    def _switched_counts(self) -> dict[str, int]:
        try:
            return {h: len(fs) for h, fs in self.switched_flows().items()}
        except (OSError, LabError):  # the gateway is missing: status still answers
            return {}


def _registry_path(prefix: str) -> str:
    return os.path.join(REGISTRY_DIR, prefix + ".json")


def remove_prefix(prefix: str) -> list[str]:
    """Remove every namespace named `<prefix>-*` (killing its processes) and its registry."""
    removed = []
    for name in netns.listing():
        if name.startswith(prefix + "-") and "-" not in name[len(prefix) + 1:]:
            netns.remove(name)
            removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_registry_path(prefix))
    if removed:
        log.info("lab_leftovers_removed", prefix=prefix, namespaces=removed)
    return removed


def _owner_alive(pid: int | None, start: int | None) -> bool:
    if pid is None:
        return True  # made by `tcpcp lab up`: lives until `tcpcp lab down`
    return netns.process_start_time(pid) == start


def sweep_stale() -> list[str]:
    """Remove labs whose owning process has died (e.g. a test run killed with SIGKILL)."""
    swept = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(REGISTRY_DIR):
            if not entry.endswith(".json"):
                continue
            prefix = entry[:-5]
            try:
                with open(os.path.join(REGISTRY_DIR, entry)) as f:
                    state = json.load(f)
                alive = _owner_alive(state.get("owner_pid"), state.get("owner_start"))
            except (OSError, ValueError):
                alive = False
            if not alive:
                remove_prefix(prefix)
                swept.append(prefix)
    # automatically named labs whose registry file is gone
    for name in netns.listing():
        m = _AUTO_PREFIX.match(name.rsplit("-", 1)[0])
        if m and not os.path.exists(_registry_path(name.rsplit("-", 1)[0])):
            pid = int(m.group(1))
            if netns.process_start_time(pid) is None:
                netns.remove(name)
                swept.append(name)
    return swept


def list_labs() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(e[:-5] for e in os.listdir(REGISTRY_DIR) if e.endswith(".json"))
    return []


@contextlib.contextmanager
def lab(prefix: str | None = None, stores: int = 1) -> Iterator[Lab]:
    """`with lab() as l:` — the same as `with Lab() as l:`, also removed on SIGTERM."""
    the_lab = Lab(prefix, stores)
    previous = signal.getsignal(signal.SIGTERM)

    owner = os.getpid()

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper (pyroute2 forks): die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        with the_lab:
            yield the_lab
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
