"""The lab's per-connection switch: policy rules on the gateway move single connections of the
service address to another host while every other connection, and every new one, stays on the
main route; replies of a moved connection pass a strict reverse-path filter and conntrack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import IPRoute

from kernel import repair
from kernel.sanity import RestorePolicy
from ops.gatelab import recv_exactly
from ops.lab import FLOW_TABLE_BASE, SERVER_HOSTS, FlowSwitch, Lab, LabError
from ops.wait import wait_until

PORT = 8310
NFT_TABLE = "tcpcp_flowswitch_check"
NFT_RULES = f"""
table inet {NFT_TABLE} {{
  chain reverse_path {{
    type filter hook prerouting priority -150
    fib saddr . iif oif missing counter drop
  }}
  chain forward_check {{
    type filter hook forward priority 0
    ct state invalid counter drop
    ct state established counter
  }}
}}
"""


@pytest.fixture(scope="module")
def strict_gateway(lab: Lab) -> Iterator[Lab]:
    """The gateway with strict reverse-path filtering (rp_filter=1 for IPv4, an nft fib check
    for both families) and conntrack dropping invalid forwarded packets, with counters."""
    for key in ("all", "default", "br0", "v-peer"):
        lab.sysctl("gw", f"net.ipv4.conf.{key}.rp_filter", 1)
    lab.run("gw", ["nft", "-f", "-"], input=NFT_RULES, text=True, check=True)
    try:
        yield lab
    finally:
        lab.run("gw", ["nft", "delete", "table", "inet", NFT_TABLE], check=False)
        lab.unswitch_flows()


def _nft_counters(lab: Lab) -> dict[str, int]:
    out = lab.run("gw", ["nft", "-j", "list", "table", "inet", NFT_TABLE], capture_output=True,
                  text=True, check=True).stdout
    rules = [e["rule"] for e in json.loads(out)["nftables"] if "rule" in e]
    names = {("reverse_path", 0): "reverse_path_drop", ("forward_check", 0): "invalid_drop",
             ("forward_check", 1): "established"}
    seen: dict[str, int] = {}
    counters = {}
    for rule in rules:
        position = seen.get(rule["chain"], 0)
        seen[rule["chain"]] = position + 1
        packets = next(x["counter"]["packets"] for x in rule["expr"] if "counter" in x)
        counters[names[rule["chain"], position]] = packets
    return counters


def _listener(family: int, port: int) -> socket.socket:
    """Listening on the service address before the host has it (IP_TRANSPARENT)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(af, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 4:
        s.setsockopt(socket.IPPROTO_IP, repair.IP_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, repair.IPV6_TRANSPARENT, 1)
    s.bind((Lab.service(family), port))
    s.listen(16)
    return s


def _connect(lab: Lab, family: int, port: int,
             listener: socket.socket) -> tuple[socket.socket, socket.socket, FlowSwitch]:
    peer = lab.call("peer", socket.create_connection, (lab.service(family), port), 3)
    listener.settimeout(3)
    server, _ = listener.accept()
    flow = FlowSwitch(lab.addr("peer", family), peer.getsockname()[1], lab.service(family), port)
    return peer, server, flow


def _both_ways(peer: socket.socket, server: socket.socket, tag: str) -> None:
    up, down = f"up {tag}".encode(), f"down {tag}".encode()
    peer.sendall(up)
    assert recv_exactly(server, len(up), timeout=5) == up
    server.sendall(down)
    assert recv_exactly(peer, len(down), timeout=5) == down


def _pass(lab: Lab, server: socket.socket, to_host: str,
          switch: Callable[[], object]) -> socket.socket:
    """Pass the server end of a connection to `to_host` by TCP_REPAIR; `switch()` moves the
    traffic between restore and activation (as the resurrector does)."""
    ici = repair.dump(server, stay_in_repair=True)
    repair.discard(server)
    with lab.enter(to_host):
        restored = repair.restore(ici, RestorePolicy.serving(str(ici.identity.local_ip)))
    switch()
    return repair.activate(restored)


MARK = 333  # payload length of the last segment each capture must hold before it stops


class _Tcpdump:
    """tcpdump on eth0 of a lab host, TCP to or from the service port, into a pcap file."""

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix=f"{lab.prefix}-{host}-", suffix=".pcap")
        os.close(fd)
        self.proc = lab.popen(host, ["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode",
                                     "-s", "128", "-w", self.path, f"tcp port {port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        said = bytearray()

        def listening() -> bool:
            assert self.proc.stderr is not None and self.proc.poll() is None, bytes(said)
            said.extend(self.proc.stderr.read() or b"")
            return b"listening on" in said

        wait_until(listening, 10, what=f"tcpdump on {host}")

    def lines(self, flow: FlowSwitch | None = None) -> list[str]:
        """One line per captured packet (of `flow` only, when given)."""
        expr = ["tcp", "port", str(flow.peer_port)] if flow else []
        return subprocess.run(["tcpdump", "-r", self.path, "-n", *expr], capture_output=True,
                              text=True, check=False).stdout.splitlines()

    def stop_after_mark(self, flow: FlowSwitch) -> None:
        """Stop once the MARK-long segment of `flow` is in the file: all before it is too."""
        wait_until(lambda: any(f"length {MARK}" in x for x in self.lines(flow)), 10,
                   what=f"the mark of {flow} in {self.path}")
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)
        assert self.proc.returncode in (0, -signal.SIGINT), f"tcpdump exited {self.proc.returncode}"


def _mark(peer: socket.socket, server: socket.socket) -> None:
    server.sendall(b"m" * MARK)
    assert recv_exactly(peer, MARK, timeout=5) == b"m" * MARK


@pytest.mark.parametrize("family", [4, 6])
def test_only_the_switched_connection_reaches_standby_new_ones_stay_on_origin_and_it_returns(
        strict_gateway: Lab, family: int) -> None:
    lab = strict_gateway
    port = PORT + family
    on_origin = lab.call("origin", _listener, family, port)
    on_standby = lab.call("standby", _listener, family, port)
    socks = [on_origin, on_standby]
    pcaps: list[_Tcpdump] = []
    before = _nft_counters(lab)
    try:
        a_peer, a_server, a = _connect(lab, family, port, on_origin)
        b_peer, b_server, b = _connect(lab, family, port, on_origin)
        socks += [a_peer, a_server, b_peer, b_server]
        _both_ways(a_peer, a_server, "a before")
        _both_ways(b_peer, b_server, "b before")

        origin_cap, standby_cap = caps = [_Tcpdump(lab, h, port) for h in ("origin", "standby")]
        pcaps += caps
        try:
            a_server = _pass(lab, a_server, "standby",
                             lambda: lab.switch_flows([a], "standby"))
            socks.append(a_server)
            assert lab.switched_flows() == {"standby": [a]}
            assert (lab.route_of(a), lab.route_of(b)) == ("standby", "origin")
            for i in range(3):
                _both_ways(a_peer, a_server, f"a on standby {i}")
                _both_ways(b_peer, b_server, f"b on origin {i}")
            c_peer, c_server, c = _connect(lab, family, port, on_origin)  # accepted on origin
            socks += [c_peer, c_server]
            _both_ways(c_peer, c_server, "c new")
            on_standby.setblocking(False)
            with pytest.raises(BlockingIOError):
                on_standby.accept()
            _mark(a_peer, a_server)
            _mark(c_peer, c_server)
            standby_cap.stop_after_mark(a)
            origin_cap.stop_after_mark(c)
        finally:
            for cap in caps:
                cap.stop()
        assert standby_cap.lines(a), "the switched connection never reached standby"
        assert standby_cap.lines(b) == standby_cap.lines(c) == []
        assert origin_cap.lines(b) and origin_cap.lines(c)
        assert origin_cap.lines(a) == []
        assert [x for x in standby_cap.lines() if "Flags [R" in x] == []

        origin_cap, standby_cap = caps = [_Tcpdump(lab, h, port) for h in ("origin", "standby")]
        pcaps += caps

        def back() -> None:
            assert lab.unswitch_flows([a]) == [a]

        try:
            a_server = _pass(lab, a_server, "origin", back)
            socks.append(a_server)
            assert lab.switched_flows() == {}
            assert lab.route_of(a) == "origin"
            for i in range(3):
                _both_ways(a_peer, a_server, f"a back on origin {i}")
                _both_ways(b_peer, b_server, f"b still on origin {i}")
            _mark(a_peer, a_server)
            origin_cap.stop_after_mark(a)
        finally:
            for cap in caps:
                cap.stop()
        assert origin_cap.lines(a), "the connection did not return to origin"
        assert standby_cap.lines() == []
    finally:
        for s in socks:
            s.close()
        for cap in pcaps:
            cap.stop()
            os.unlink(cap.path)
    after = _nft_counters(lab)
    assert after["established"] > before["established"], "conntrack saw none of the traffic"
    assert after["invalid_drop"] == before["invalid_drop"]
    assert after["reverse_path_drop"] == before["reverse_path_drop"]
    assert lab.sysctl_get("gw", "net.ipv4.conf.br0.rp_filter") == "1"


def test_a_connection_switched_again_has_one_rule_at_its_latest_host(strict_gateway: Lab) -> None:
    lab = strict_gateway
    flow = FlowSwitch(lab.addr("peer"), 41000, lab.service(4), PORT)
    other = FlowSwitch(lab.addr("peer"), 41001, lab.service(4), PORT)
    try:
        assert lab.switch_flows([flow, other], "standby") == 2
        assert lab.switch_flows([flow], "standby") == 0  # already there: nothing to add
        assert lab.switch_flows([flow], "store") == 1
        assert lab.switched_flows() == {"standby": [other], "store": [flow]}
        assert (lab.route_of(flow), lab.route_of(other)) == ("store", "standby")
        assert lab.switch_flows([flow], "origin") == 1  # passed back while the main route
        assert lab.route_of(flow) == "origin"           # points there too: still one rule
        with IPRoute(netns=lab.netns("gw")) as ipr:
            ours = [r for r in ipr.get_rules(family=socket.AF_INET)
                    if r.get_attr("FRA_TABLE", 0) - FLOW_TABLE_BASE in SERVER_HOSTS.values()]
        assert sorted(r.get_attr("FRA_SPORT_RANGE") for r in ours) == ["41000:41000",
                                                                        "41001:41001"]
    finally:
        lab.unswitch_flows([flow, other])
    assert lab.switched_flows() == {}
    assert lab.route_of(flow) == "origin"


def test_a_thousand_connections_switch_and_return_over_ipv4_and_ipv6(strict_gateway: Lab) -> None:
    lab = strict_gateway
    flows = [FlowSwitch(lab.addr("peer", family), 20000 + i, lab.service(family), PORT)
             for family in (4, 6) for i in range(500)]
    untouched = FlowSwitch(lab.addr("peer", 6), 20500, lab.service(6), PORT)
    t0 = time.monotonic()
    try:
        assert lab.switch_flows(flows, "standby") == 1000
        switched_s = time.monotonic() - t0
        assert lab.switched_flows() == {"standby": sorted(flows)}
        for flow in (flows[0], flows[499], flows[500], flows[999]):
            assert lab.route_of(flow) == "standby"
        assert lab.route_of(untouched) == "origin"
        with IPRoute(netns=lab.netns("gw")) as ipr:
            tables = [r.get_attr("FRA_TABLE") for family in (socket.AF_INET, socket.AF_INET6)
                      for r in ipr.get_rules(family=family)]
        assert tables.count(lab.flow_table("standby")) == 1000
    finally:
        removed = lab.unswitch_flows(flows)
    assert sorted(removed) == sorted(flows)
    assert lab.switched_flows() == {}
    assert lab.route_of(flows[0]) == lab.route_of(flows[999]) == "origin"
    print(f"1,000 connections switched in {switched_s * 1000:.0f} ms")


def test_identities_from_the_service_host_are_taken_as_flows() -> None:
    from kernel.ici import Family, Identity

    ident = Identity(Family.IPV6, socket.inet_pton(socket.AF_INET6, "fd77:9::1"), 8080,
                     socket.inet_pton(socket.AF_INET6, "fd77:1::2"), 40000)
    flow = FlowSwitch.of(ident)
    assert flow == FlowSwitch("fd77:1::2", 40000, "fd77:9::1", 8080)
    assert str(flow) == "[fd77:1::2]:40000>[fd77:9::1]:8080"
    assert FlowSwitch.parse(str(flow)) == flow
    assert FlowSwitch.parse("10.77.1.2:40000>10.77.9.1:8080").family == 4
    with pytest.raises(LabError, match="PEER_IP:PORT>SERVICE_IP:PORT"):
        FlowSwitch.parse("10.77.1.2:40000")
    with pytest.raises(LabError, match="different families"):
        FlowSwitch("10.77.1.2", 1, "fd77:9::1", 2)
    with pytest.raises(LabError, match="1-65535"):
        FlowSwitch("10.77.1.2", 0, "10.77.9.1", 2)


def test_flows_to_other_addresses_or_hosts_are_refused(strict_gateway: Lab) -> None:
    lab = strict_gateway
    with pytest.raises(LabError, match="service address"):
        lab.switch_flows([FlowSwitch(lab.addr("peer"), 40000, lab.addr("origin"), 80)],
                         "standby")
    with pytest.raises(LabError, match="server host"):
        lab.switch_flows([FlowSwitch(lab.addr("peer"), 40000, lab.service(4), 80)], "peer")
    assert lab.switched_flows() == {}


def test_switch_flow_and_unswitch_flow_from_the_command_line(strict_gateway: Lab) -> None:
    lab = strict_gateway
    tcpcp = os.path.join(os.path.dirname(sys.executable), "tcpcp")
    flows = [f"{lab.addr('peer')}:42000>{lab.service(4)}:{PORT}",
             f"[{lab.addr('peer', 6)}]:42001>[{lab.service(6)}]:{PORT}"]

    def cli(*args: str) -> str:
        return subprocess.run([tcpcp, "lab", "--prefix", lab.prefix, *args], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    try:
        assert "2 connections switched to standby" in cli("switch-flow", "--to", "standby",
                                                          *flows)
        assert json.loads(cli("flows", "--json")) == {"standby": sorted(flows)}
        assert lab.route_of(FlowSwitch.parse(flows[1])) == "standby"
        assert "switched connections: 2 to standby" in cli("status")
        assert "1 connections back" in cli("unswitch-flow", flows[0])
        assert lab.switched_flows() == {"standby": [FlowSwitch.parse(flows[1])]}
        assert "1 connections back" in cli("unswitch-flow", "--all")
        assert lab.switched_flows() == {}
        bad = subprocess.run([tcpcp, "lab", "--prefix", lab.prefix, "switch-flow", "--to",
                              "standby", "10.77.1.2:1"], capture_output=True, text=True,
                             check=False)
        assert bad.returncode != 0 and "PEER_IP:PORT>SERVICE_IP:PORT" in bad.stderr
    finally:
        lab.unswitch_flows()
