"""Planned passing in the lab, verified on the wire: the peer's connections (counting echo and a
curl download) survive origin -> standby -> origin with no RST, no reconnect, no PAWS drop and
every byte exactly once; also without timestamps, SACK or window scaling, over IPv6, for 1,000
connections at once, and with a failure injected at every step of the pass."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kernel.pass_states import Step
from ops.apps.demo_server import EchoPeers, counting
from ops.capture import FIN, RST, SYN, Capture, Segment
from ops.demo import RECEIVE_PORT, SERVICE_PORT, demo_servers
from ops.lab import Lab
from ops.passcli import LabSwitch, pass_connections, request
from ops.wait import wait_until

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def servers(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Demo servers isolating passed flows with the ACK gate's freeze (the default), fault
    injection on, the default transfer deadline (10 s: a switch command run as a new process
    took 5.4 s on a loaded machine, and a shorter deadline undid a pass that was going well)."""
    tmp = tmp_path_factory.mktemp("demo")
    with demo_servers(lab, tmp, own_address=True, log_level="info", allow_faults=True,
                      extra=["--transfer-timeout", "10"]) as controls:
        controls["tmp"] = str(tmp)
        yield controls
    lab.unswitch_flows()


def status(control: str) -> dict[str, Any]:
    return request(control, {"cmd": "status"})


@pytest.fixture(autouse=True)
def quiet_servers(servers: dict[str, str]) -> None:
    """Each test starts with no connection left on either server (the previous test's peers
    have closed theirs and the servers have seen it), so passes and counts are its own."""
    wait_until(lambda: all(status(servers[h])["conns"] == 0 for h in ("origin", "standby")),
               20, what="no connection left from an earlier test on origin and standby")


def tcpcp_pass(lab: Lab, control: str, src: str, dst: str, family: int = 4, *,
               count: int = 0, fault: dict[str, Any] | None = None,
               receive_port: int = RECEIVE_PORT) -> dict[str, Any]:
    """What `tcpcp pass --lab ... --from-host SRC --to-host DST` does (this process owns the
    lab): the destination's receiver is always reached over IPv4, its own address."""
    to = f"{lab.addr(dst, 4)}:{receive_port}"
    return pass_connections(control, to, dst, LabSwitch(lab, src, dst), count=count,
                            fault=fault)


def passed(report: dict[str, Any], n: int) -> None:
    assert report["event"] == "passed", json.dumps(report)
    assert report["passed"] == n, json.dumps(report)


def pass_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`tcpcp --log-format json pass ARGS` in a child process (its report: last_report)."""
    return subprocess.run([sys.executable, "-m", "ops.cli", "--log-format", "json", "pass",
                           *args], capture_output=True, text=True, timeout=120, check=False)


def last_report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def open_echo(lab: Lab, family: int, n: int, port: int = SERVICE_PORT) -> list[socket.socket]:
    with lab.enter("peer"):
        return [socket.create_connection((lab.service(family), port), timeout=10)
                for _ in range(n)]


def flowing(peers: EchoPeers, since: list[int] | None = None, timeout: float = 15) -> list[int]:
    """Wait until every echo connection got more back than at `since` (or anything at all);
    returns the counts then."""
    base = since or [0] * len(peers.received)
    wait_until(lambda: peers.errors or all(r > b for r, b in zip(peers.received, base,
                                                                  strict=True)),
               timeout, what="every echo connection carrying data")
    assert peers.errors == {}, peers.errors
    return list(peers.received)


def finish(peers: EchoPeers, socks: list[socket.socket]) -> None:
    """Every echo came back once, in order, with no error; then close."""
    assert peers.finish(timeout_s=60), f"echo incomplete: sent {peers.sent} got {peers.received}"
    assert peers.errors == {}
    for s in socks:
        s.close()


def paws_counters(lab: Lab) -> dict[str, int]:
    out = lab.run("peer", ["nstat", "-azs", "--json"], capture_output=True, text=True,
                  check=True).stdout
    counters = json.loads(out)["kernel"]
    paws = {k: int(v) for k, v in counters.items() if "PAWS" in k}
    assert "TcpExtPAWSEstab" in paws, f"nstat shows no PAWS counters: {sorted(counters)[:20]}"
    return paws


def resets_before_close(segments: list[Segment], server_port: int = SERVICE_PORT) -> int:
    """RST segments of connections still open: sent before either end's first FIN."""
    first_fin: dict[int, float] = {}
    for seg in segments:
        port = seg.dport if seg.sport == server_port else seg.sport
        if seg.flags & FIN:
            first_fin.setdefault(port, seg.at)
    return sum(1 for seg in segments if seg.flags & RST
               and seg.at < first_fin.get(seg.dport if seg.sport == server_port else seg.sport,
                                          float("inf")))


def clock_faults(segments: list[Segment], server_port: int = SERVICE_PORT) -> list[str]:
    """What is wrong with the server's TCP timestamp clock as the peer saw it, per connection:
    a TSval running faster than the wall clock (1 ms ticks; allowed: 1 s of restore margins),
    or a data segment whose TSval is more than the PAWS window (1) behind an earlier one.
    Pure ACKs overtaken on the lab's veths may arrive behind (the peer drops them as old
    ACKs, TcpExtPAWSOldAck), which loses nothing."""
    flows: dict[int, list[Segment]] = {}
    for seg in segments:
        if seg.sport == server_port and seg.tsval is not None:
            flows.setdefault(seg.dport, []).append(seg)
    faults = []
    for port, segs in flows.items():
        first, last = segs[0], segs[-1]
        assert first.tsval is not None and last.tsval is not None
        ran = (last.tsval - first.tsval) % 2**32
        if ran > (last.at - first.at) * 1000 + 1000:
            faults.append(f"port {port}: TSval ran {ran} in {last.at - first.at:.3f} s")
        top = first.tsval
        for seg in segs:
            assert seg.tsval is not None
            behind = (top - seg.tsval) % 2**32
            if 1 < behind < 2**31 and seg.payload_len:
                faults.append(f"port {port}: data with TSval {seg.tsval}, {behind} behind")
            elif behind >= 2**31 or behind == 0:
                top = seg.tsval
    return faults


@dataclass
class PeerView:
    """What the peer saw over one test: its capture of the service port and its PAWS drops."""

    cap: Capture
    paws_before: dict[str, int]
    segments: list[Segment] = field(default_factory=list)


@pytest.fixture
def peer_view(lab: Lab, tmp_path: Path) -> Iterator[PeerView]:
    """Capture in the peer's namespace for the whole test; after it: no RST on an open
    connection, a sane server clock, no PAWS drop of data (old pure ACKs aside)."""
    cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {SERVICE_PORT}",
                         path=tmp_path / "peer.pcap", snaplen=128)
    cap.start()
    view = PeerView(cap, paws_counters(lab))
    try:
        yield view
    finally:
        cap.stop()
    view.segments = cap.segments()
    assert resets_before_close(view.segments) == 0, "the peer saw RST on an open connection"
    assert clock_faults(view.segments) == []
    after = paws_counters(lab)
    before = dict(view.paws_before)
    after.pop("TcpExtPAWSOldAck", None)
    before.pop("TcpExtPAWSOldAck", None)
    assert after == before, "the peer dropped segments by PAWS"


SYN_OPTIONS = {"net.ipv4.tcp_timestamps": 8, "net.ipv4.tcp_sack": 4,
               "net.ipv4.tcp_window_scaling": 3}
"""The sysctl that turns each option off in the peer, and the option's kind in its SYN."""


@pytest.mark.parametrize(("family", "sysctl_off"), [
    (4, None), (6, None),
    (4, "net.ipv4.tcp_timestamps"), (4, "net.ipv4.tcp_sack"), (4, "net.ipv4.tcp_window_scaling"),
])
def test_peer_keeps_its_connections_while_passed_origin_standby_origin(
    lab: Lab, servers: dict[str, str], tmp_path: Path, family: int, sysctl_off: str | None,
) -> None:
    if sysctl_off:
        lab.sysctl("peer", sysctl_off, "0")
    cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {SERVICE_PORT}", snaplen=128).start()
    paws_before = paws_counters(lab)
    size = 1_500_000
    host = f"[{lab.service(6)}]" if family == 6 else lab.service(4)
    out = tmp_path / "download"
    try:
        url = f"http://{host}:{SERVICE_PORT}/{size}/{size // 2}"  # paced: about 2 s
        curl = lab.popen("peer", ["curl", "-sS", "-o", str(out), "-w", "%{num_connects}", url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        socks = open_echo(lab, family, 3)
        with EchoPeers(socks) as peers:
            wait_until(lambda: status(servers["origin"])["kinds"].get("http"), 10,
                       what="curl's request on origin")
            flowing(peers)
            there = tcpcp_pass(lab, servers["origin"], "origin", "standby", family)
            mid = flowing(peers, flowing(peers))
            back = tcpcp_pass(lab, servers["standby"], "standby", "origin", family)
            flowing(peers, mid)
            finish(peers, socks)
        rc = curl.wait(timeout=60)
        err = curl.stderr.read().decode() if curl.stderr else ""
        connects = curl.stdout.read().decode() if curl.stdout else ""
        assert rc == 0, f"curl failed: {err}"
        assert connects == "1", f"curl connected {connects} times"
        assert out.read_bytes() == counting(0, size)
        passed(there, 4)
        passed(back, 4)
    finally:
        cap.stop()
        if sysctl_off:
            lab.sysctl("peer", sysctl_off, "1")
    captured = cap.segments()
    assert len(captured) > 100
    assert resets_before_close(captured) == 0, "the peer saw RST"
    assert paws_counters(lab) == paws_before
    assert clock_faults(captured) == []
    syns = [s for s in captured if s.flags & (SYN | 0x10) == SYN]  # the peer's 4 SYNs
    assert len(syns) == 4
    for name, kind in SYN_OPTIONS.items():
        offered = [kind in s.option_kinds for s in syns]
        assert offered == [sysctl_off != name] * 4, f"{name} offered in the SYNs: {offered}"
    assert status(servers["origin"])["errors"] == 0
    assert status(servers["standby"])["errors"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_a_thousand_connections_are_passed_at_once_and_back(
    lab: Lab, servers: dict[str, str], peer_view: PeerView, family: int,
) -> None:
    socks = open_echo(lab, family, 1000)
    with EchoPeers(socks, chunk=200, interval_s=0.05) as peers:
        flowing(peers, timeout=30)
        passed(tcpcp_pass(lab, servers["origin"], "origin", "standby", family), 1000)
        assert status(servers["standby"])["conns"] == 1000
        mid = flowing(peers, timeout=30)
        passed(tcpcp_pass(lab, servers["standby"], "standby", "origin", family), 1000)
        flowing(peers, mid, timeout=30)
        finish(peers, socks)
    assert status(servers["origin"])["errors"] == 0
    assert status(servers["standby"])["errors"] == 0


def test_tcpcp_pass_command_moves_connections_with_the_lab_or_a_switch_command(
    lab: Lab, servers: dict[str, str], peer_view: PeerView,
) -> None:
    socks = open_echo(lab, 4, 5)
    base = status(servers["standby"])["conns"]
    with EchoPeers(socks) as peers:
        flowing(peers)
        done = pass_cli("--control", servers["origin"], "--to",
                        f"{lab.addr('standby', 4)}:{RECEIVE_PORT}", "--to-name", "standby",
                        "--switch-cmd", f"{sys.executable} -m tests.integration.flowswitch_cmd "
                        f"{lab.prefix} origin standby")
        assert done.returncode == 0, done.stdout + done.stderr[-2000:]
        passed(last_report(done), 5)
        assert status(servers["standby"])["conns"] == base + 5
        mid = flowing(peers)
        back = pass_cli(  # and back, with the lab switch done by tcpcp pass itself
            "--control", servers["standby"], "--to", f"{lab.addr('origin', 4)}:{RECEIVE_PORT}",
            "--lab", lab.prefix, "--from-host", "standby", "--to-host", "origin")
        assert back.returncode == 0, back.stdout + back.stderr[-2000:]
        passed(last_report(back), 5)
        flowing(peers, mid)
        finish(peers, socks)


def test_only_the_passed_connections_move_and_new_ones_keep_landing_on_origin(
    lab: Lab, servers: dict[str, str], peer_view: PeerView,
) -> None:
    """A pass of 2 of 5 connections: the 3 others, and a connection opened after the switch,
    stay on origin (a whole-address switch would have had them reset by standby)."""
    socks = open_echo(lab, 4, 5)
    before = {h: status(servers[h])["conns"] for h in ("origin", "standby")}
    with EchoPeers(socks) as peers:
        flowing(peers)
        passed(tcpcp_pass(lab, servers["origin"], "origin", "standby", count=2), 2)
        late = open_echo(lab, 4, 1)
        with EchoPeers(late) as late_peers:
            flowing(late_peers)
            finish(late_peers, late)
        after = {h: status(servers[h])["conns"] for h in ("origin", "standby")}
        assert after["standby"] == before["standby"] + 2
        assert after["origin"] == before["origin"] - 2
        mid = flowing(peers)
        passed(tcpcp_pass(lab, servers["standby"], "standby", "origin"),
               after["standby"])
        flowing(peers, mid)
        finish(peers, socks)


def test_connections_passed_back_and_forth_faster_than_the_isolation_grace_keep_flowing(
    lab: Lab, servers: dict[str, str], peer_view: PeerView,
) -> None:
    socks = open_echo(lab, 4, 2)
    with EchoPeers(socks) as peers:
        for src, dst in [("origin", "standby"), ("standby", "origin")] * 2:
            flowing(peers)
            passed(tcpcp_pass(lab, servers[src], src, dst), 2)
        mid = list(peers.sent)
        # past every grace timer (1 s), none may cut the live flows: wait for 2 s of traffic
        wait_until(lambda: all(a > m + 40_000 for a, m in zip(peers.received, mid,
                                                                strict=True)), 15,
                   what="the flows carrying 40 kB more each")
        finish(peers, socks)


def test_connections_the_destination_refuses_stay_on_origin_and_keep_flowing(
    lab: Lab, servers: dict[str, str], peer_view: PeerView,
) -> None:
    served = open_echo(lab, 4, 2)
    with lab.enter("peer"):
        own = [socket.create_connection((lab.addr("origin", 4), SERVICE_PORT), timeout=10)]
    with EchoPeers(served + own) as peers:
        flowing(peers)
        report = tcpcp_pass(lab, servers["origin"], "origin", "standby")
        assert report["event"] == "passed" and report["passed"] == 2, report
        assert len(report["resumed"]) == 1
        assert "10.77.2.10 is not an address this host serves" in report["resumed"][0][1]
        mid = flowing(peers)
        passed(tcpcp_pass(lab, servers["standby"], "standby", "origin"), 2)
        flowing(peers, mid)
        finish(peers, served + own)


INJECTED = [
    ({"step": Step.ISOLATE.value, "after": 1}, None, "resumed"),
    ({"step": Step.DUMP.value, "after": 1}, None, "resumed"),
    ({"step": Step.SEND.value}, None, "resumed"),
    ({"step": Step.REPORT.value}, None, "resumed"),
    ({"step": Step.SWITCH.value}, None, "resumed"),
    ({"step": Step.ACTIVATE.value}, None, "closed"),
    (None, {"step": "restore", "index": 1}, "one resumed"),
    (None, {"step": "activate", "index": 1}, "one resumed"),
    (None, {"step": "no_done"}, "closed"),
]


@pytest.mark.parametrize(("origin_fault", "destination_fault", "expect"), INJECTED,
                         ids=[f"{(o or d)['step']}-{e.replace(' ', '_')}"
                              for o, d, e in INJECTED])
def test_a_failure_at_any_step_leaves_every_connection_passed_resumed_or_closed_never_stranded(
    lab: Lab, servers: dict[str, str], peer_view: PeerView, origin_fault: dict[str, Any] | None,
    destination_fault: dict[str, Any] | None, expect: str,
) -> None:
    """Three connections passed with one failure injected. Every connection ends exactly one
    way, the peer's echo keeps every byte, and the peer sees no RST. A connection "closed" on
    the origin (the destination never confirmed) is live on the destination, so it flows on."""
    socks = open_echo(lab, 4, 3)
    home = {h: status(servers[h])["conns"] for h in ("origin", "standby")}
    with EchoPeers(socks) as peers:
        flowing(peers)
        if destination_fault:
            assert request(servers["standby"], {"cmd": "fault",
                                                "receive": destination_fault})["event"] == "armed"
        report = tcpcp_pass(lab, servers["origin"], "origin", "standby", fault=origin_fault)
        n_resumed, n_closed = len(report["resumed"]), len(report["closed"])
        assert report["passed"] + n_resumed + n_closed == 3, report
        if expect == "resumed":
            assert report["event"] == "failed" and n_resumed == 3, report
            assert "injected fault" in report["error"]
        elif expect == "one resumed":
            assert (report["passed"], n_resumed, n_closed) == (2, 1, 0), report
            assert "injected fault" in report["resumed"][0][1]
        else:
            assert (report["passed"], n_resumed, n_closed) == (0, 0, 3), report
            assert "never confirmed" in report["closed"][0][1]
        moved = report["passed"] + n_closed
        wait_until(lambda: status(servers["standby"])["conns"] == home["standby"] + moved, 10,
                   what=f"{moved} connections live on standby")
        assert status(servers["origin"])["conns"] == home["origin"] - moved
        mid = flowing(peers)
        if moved:
            passed(tcpcp_pass(lab, servers["standby"], "standby", "origin"),
                   home["standby"] + moved)
        flowing(peers, mid)
        finish(peers, socks)
    assert status(servers["origin"])["errors"] == 0


def test_the_capture_check_sees_a_reset_when_there_is_one(lab: Lab) -> None:
    """Control for the no-RST checks: a connection refused by origin shows up as one RST."""
    with Capture.in_lab(lab, "peer", "eth0", "tcp port 9") as cap:
        with lab.enter("peer"), pytest.raises(ConnectionRefusedError):
            socket.create_connection((lab.service(4), 9), timeout=5)
        cap.wait_for(lambda s: s.flags & RST, what="the RST")
    segments = cap.segments()
    assert len(segments) == 2
    assert resets_before_close([*segments], server_port=9) == 1


def test_the_clock_check_flags_a_microsecond_clock_and_data_behind_but_not_late_acks() -> None:
    """Control for clock_faults: what a restore of the wrong TCP_TIMESTAMP parity did (TSval
    1,000 times too fast) and a data segment behind are flagged; a late pure ACK is not."""
    def seg(at: float, tsval: int, payload: int = 0, port: int = 40000) -> Segment:
        opts = bytes([1, 1, 8, 10]) + tsval.to_bytes(4, "big") + bytes(4)
        return Segment(at, "10.77.9.1", "10.77.1.2", SERVICE_PORT, port, 0, 0, 0x10, 0, opts,
                       b"", payload)

    good = [seg(0.0, 1000), seg(0.1, 1100, 200), seg(0.1005, 1098), seg(0.2, 1200, 200)]
    assert clock_faults(good) == []
    fast = [seg(0.0, 1000), seg(0.1, 1000 + 100_000, 200)]
    assert clock_faults(fast) == ["port 40000: TSval ran 100000 in 0.100 s"]
    late_data = [seg(0.0, 1000), seg(0.1, 1100, 200), seg(0.11, 1095, 100)]
    assert clock_faults(late_data) == ["port 40000: data with TSval 1095, 5 behind"]


def test_resets_after_a_fin_are_counted_apart_from_resets_of_open_connections() -> None:
    def seg(at: float, flags: int, port: int, from_server: bool = True) -> Segment:
        ports = (SERVICE_PORT, port) if from_server else (port, SERVICE_PORT)
        return Segment(at, "a", "b", *ports, 0, 0, flags, 0, b"", b"", 0)

    closing = [seg(0.0, 0x10, 1), seg(0.1, 0x11, 1, from_server=False), seg(0.2, 0x04, 1)]
    assert resets_before_close(closing) == 0
    assert resets_before_close([seg(0.0, 0x10, 2), seg(0.1, 0x04, 2), *closing]) == 1
