"""Planned passing in the lab, verified on the wire: the peer's connections (counting echo and a
curl download) survive origin -> standby -> origin with no RST, no reconnect, no PAWS drop and
every byte exactly once; also without timestamps, SACK or window scaling, over IPv6, and for
1,000 connections at once."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kernel import codec
from kernel.demo_server import EchoPeers, counting
from kernel.ici import Family, Ici, Identity, Params, TcpOption, TcpState, Timestamp, Window
from kernel.passcli import pass_connections
from kernel.passing import (
    ABORT,
    MAX_BATCH_BYTES,
    Handoff,
    RestoreReport,
    decode_batch,
    encode_batch,
)
from ops.demo import RECEIVE_PORT, SERVICE_PORT, demo_servers
from ops.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def servers(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Demo servers isolating passed flows with the ACK gate's freeze (the default)."""
    with demo_servers(lab, tmp_path_factory.mktemp("demo"), own_address=True,
                      log_level="info") as controls:
        yield controls


def status(control: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control)
        s.sendall(b'{"cmd": "status"}\n')
        return dict(json.loads(s.makefile("rb").readline()))


def tcpcp_pass(lab: Lab, control: str, to_host: str, family: int,
               receive_port: int = RECEIVE_PORT) -> dict[str, Any]:
    """What `tcpcp pass --lab ... --switch-to HOST` does, with the switch made by this process
    (the lab's owner)."""
    addr = lab.addr(to_host, family)
    to = f"[{addr}]:{receive_port}" if family == 6 else f"{addr}:{receive_port}"
    report = pass_connections(control, to, lambda: lab.switch_route(to_host))
    assert report["event"] == "passed", report
    return report


def pass_cli(*args: str, json_logs: bool = True) -> subprocess.CompletedProcess[str]:
    """`tcpcp [--log-format json] pass ARGS` in a child process (its report: last_report)."""
    logs = ["--log-format", "json"] if json_logs else []
    return subprocess.run([sys.executable, "-m", "ops.cli", *logs, "pass", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def last_report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def assert_kept_flowing(peers: EchoPeers, mid: list[int]) -> None:
    """Every echo peer ended without error and had sent more at the end than at mid (a count
    taken after the pass): its connection kept carrying data."""
    assert peers.errors == {}
    assert all(a > m for a, m in zip(peers.sent, mid, strict=True))


def paws_counters(lab: Lab) -> dict[str, int]:
    out = lab.run("peer", ["nstat", "-azs", "--json"], capture_output=True, text=True,
                  check=True).stdout
    counters = json.loads(out)["kernel"]
    paws = {k: int(v) for k, v in counters.items() if "PAWS" in k}
    assert "TcpExtPAWSEstab" in paws, f"nstat shows no PAWS counters: {sorted(counters)[:20]}"
    return paws


@dataclass(frozen=True, slots=True)
class Segment:
    """One captured TCP segment, as far as these tests read it."""

    at: float            # capture time, seconds
    sport: int
    dport: int
    flags: int
    payload: int         # bytes of data
    tsval: int | None    # TCP timestamp option's TSval, if present
    options: frozenset[int]  # TCP option kinds present


def parse_segments(pcap: bytes) -> list[Segment]:
    """The TCP segments of an Ethernet pcap capture (IPv4 and IPv6 without extension headers)."""
    pos, out = 24, []
    while pos + 16 <= len(pcap):
        sec, usec, incl = struct.unpack_from("<III", pcap, pos)
        frame = pcap[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800 and frame[23] == 6:
            ihl = (frame[14] & 0x0F) * 4
            tcp, ip_payload = 14 + ihl, struct.unpack_from("!H", frame, 16)[0] - ihl
        elif ethertype == 0x86DD and frame[20] == 6:
            tcp, ip_payload = 14 + 40, struct.unpack_from("!H", frame, 18)[0]
        else:
            continue
        sport, dport, off, flags = struct.unpack_from("!HH8xBB", frame, tcp)
        hlen = (off >> 4) * 4
        opts, kinds, tsval, i = frame[tcp + 20 : tcp + hlen], set(), None, 0
        while i < len(opts) and opts[i] != 0:
            if opts[i] == 1:
                i += 1
                continue
            if i + 1 >= len(opts) or opts[i + 1] < 2:
                break
            kinds.add(opts[i])
            if opts[i] == 8 and opts[i + 1] == 10 and i + 6 <= len(opts):
                tsval = struct.unpack_from("!I", opts, i + 2)[0]
            i += opts[i + 1]
        out.append(Segment(sec + usec / 1e6, sport, dport, flags, ip_payload - hlen, tsval,
                           frozenset(kinds)))
    return out


def count_resets(pcap: bytes) -> tuple[int, int]:
    """(TCP segments, of which RST) in an Ethernet pcap capture."""
    segments = parse_segments(pcap)
    return len(segments), sum(bool(s.flags & 0x04) for s in segments)


def resets_before_close(segments: list[Segment], server_port: int = SERVICE_PORT) -> int:
    """RST segments of connections still open: sent before either end's first FIN."""
    first_fin: dict[int, float] = {}
    for seg in segments:
        port = seg.dport if seg.sport == server_port else seg.sport
        if seg.flags & 0x01:
            first_fin.setdefault(port, seg.at)
    return sum(1 for seg in segments if seg.flags & 0x04
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
        ran = (last.tsval - first.tsval) % 2**32  # type: ignore[operator]
        if ran > (last.at - first.at) * 1000 + 1000:
            faults.append(f"port {port}: TSval ran {ran} in {last.at - first.at:.3f} s")
        top = first.tsval
        for seg in segs:
            assert seg.tsval is not None and top is not None
            behind = (top - seg.tsval) % 2**32
            if 1 < behind < 2**31 and seg.payload:
                faults.append(f"port {port}: data with TSval {seg.tsval}, {behind} behind")
            elif behind >= 2**31 or behind == 0:
                top = seg.tsval
    return faults


class Capture:
    """tcpdump of the service port in the peer's namespace."""

    def __init__(self, lab: Lab, path: Path, port: int = SERVICE_PORT) -> None:
        self.path = path
        self.proc = lab.popen("peer", ["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode",
                                       "-s", "128", "-w", str(path), f"tcp port {port}"],
                              stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.proc.stderr.readline()  # "listening on eth0 ..."

    def stop(self) -> tuple[int, int]:
        time.sleep(0.2)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return count_resets(self.path.read_bytes())

    def segments(self) -> list[Segment]:
        """Every captured segment (after stop())."""
        return parse_segments(self.path.read_bytes())


def open_echo(lab: Lab, family: int, n: int, port: int = SERVICE_PORT) -> list[socket.socket]:
    with lab.enter("peer"):
        return [socket.create_connection((lab.service(family), port), timeout=10)
                for _ in range(n)]


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
    cap = Capture(lab, tmp_path / "peer.pcap")
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
            time.sleep(0.6)
            there = tcpcp_pass(lab, servers["origin"], "standby", family)
            time.sleep(0.6)
            sent_mid = list(peers.sent)
            back = tcpcp_pass(lab, servers["standby"], "origin", family)
            time.sleep(0.6)
            assert peers.finish(), f"echo incomplete: sent {peers.sent} got {peers.received}"
        assert peers.errors == {}
        assert all(after > mid for after, mid in zip(peers.sent, sent_mid, strict=True)), \
            "echo traffic did not continue after passing back"
        rc = curl.wait(timeout=60)
        err = curl.stderr.read().decode() if curl.stderr else ""
        connects = curl.stdout.read().decode() if curl.stdout else ""
        assert rc == 0, f"curl failed: {err}"
        assert connects == "1", f"curl connected {connects} times"
        assert out.read_bytes() == counting(0, size)
        assert there["passed"] == 4 and back["passed"] == 4, (there, back)
        for s in socks:
            s.close()
    finally:
        segments, resets = cap.stop()
        if sysctl_off:
            lab.sysctl("peer", sysctl_off, "1")
    assert segments > 100
    assert resets == 0, f"the peer saw {resets} RST segments"
    assert paws_counters(lab) == paws_before
    captured = cap.segments()
    assert clock_faults(captured) == []
    syns = [s for s in captured if s.flags & 0x12 == 0x02]  # the peer's SYNs (curl + 3 echo)
    assert len(syns) == 4
    for name, kind in SYN_OPTIONS.items():
        offered = [kind in s.options for s in syns]
        assert offered == [sysctl_off != name] * 4, f"{name} offered in the SYNs: {offered}"
    assert status(servers["origin"])["errors"] == 0
    assert status(servers["standby"])["errors"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_a_thousand_connections_are_passed_at_once_and_back(
    lab: Lab, servers: dict[str, str], tmp_path: Path, family: int,
) -> None:
    cap = Capture(lab, tmp_path / "peer.pcap")
    paws_before = paws_counters(lab)
    try:
        socks = open_echo(lab, family, 1000)
        with EchoPeers(socks, chunk=200, interval_s=0.05) as peers:
            time.sleep(0.3)
            there = tcpcp_pass(lab, servers["origin"], "standby", family)
            assert status(servers["standby"])["conns"] == 1000
            time.sleep(0.5)
            sent_mid = list(peers.sent)
            back = tcpcp_pass(lab, servers["standby"], "origin", family)
            time.sleep(0.5)
            assert peers.finish(timeout_s=60), "not every echo came back"
        assert peers.errors == {}
        assert there["passed"] == 1000 and back["passed"] == 1000
        assert sum(a > m for a, m in zip(peers.sent, sent_mid, strict=True)) == 1000
        for s in socks:
            s.close()
    finally:
        segments, resets = cap.stop()
    assert segments > 4000  # every connection's handshake and echo traffic was captured
    # No RST while the connections live. After both FINs, a delayed ACK overtaken by the
    # server's FIN can draw the peer's TIME_WAIT ACK and the server's RST (seen in 1 of 4
    # runs, IPv6): that is teardown, not passing, so it is counted apart.
    assert resets_before_close(cap.segments()) == 0, f"{resets} RST in all"
    assert clock_faults(cap.segments()) == []
    paws_after = paws_counters(lab)
    old_acks = paws_after.pop("TcpExtPAWSOldAck", 0) - paws_before.pop("TcpExtPAWSOldAck", 0)
    assert paws_after == paws_before, f"PAWS drops (old pure ACKs aside: {old_acks})"
    assert status(servers["origin"])["errors"] == 0
    assert status(servers["standby"])["errors"] == 0


def test_tcpcp_pass_command_moves_connections_and_runs_the_switch_command(
    lab: Lab, servers: dict[str, str],
) -> None:
    socks = open_echo(lab, 4, 5)
    standby = lab.addr("standby", 4)
    switch = f"{sys.executable} -m ops.cli lab --prefix {lab.prefix} switch standby"
    with EchoPeers(socks) as peers:
        time.sleep(0.3)
        done = pass_cli("--control", servers["origin"], "--to", f"{standby}:{RECEIVE_PORT}",
                        "--switch-cmd", switch)
        time.sleep(0.3)
        assert done.returncode == 0, done.stdout + done.stderr[-2000:]
        assert last_report(done)["passed"] == 5
        assert status(servers["standby"])["conns"] == 5
        mid = list(peers.sent)
        back = pass_cli(  # and back, with the lab switch done by tcpcp pass itself
            "--control", servers["standby"], "--to", f"{lab.addr('origin', 4)}:{RECEIVE_PORT}",
            "--lab", lab.prefix, "--switch-to", "origin")
        assert back.returncode == 0, back.stdout + back.stderr[-2000:]
        assert last_report(back)["passed"] == 5
        assert status(servers["origin"])["conns"] >= 5
        time.sleep(0.3)
        assert peers.finish()
    assert_kept_flowing(peers, mid)
    for s in socks:
        s.close()


def test_tcpcp_pass_refuses_to_pass_some_connections_with_a_whole_route_switch(
    lab: Lab, servers: dict[str, str],
) -> None:
    """Moving the service route moves every connection: passing only some of them that way
    would leave the others to be reset by the destination (seen: 2 of 3 reset)."""
    before = status(servers["origin"])
    done = pass_cli("--control", servers["origin"],
                    "--to", f"{lab.addr('standby', 4)}:{RECEIVE_PORT}", "--count", "1",
                    "--lab", lab.prefix, "--switch-to", "standby", json_logs=False)
    assert done.returncode == 2
    assert "--count with --switch-to: expected all connections to move" in done.stderr
    assert status(servers["origin"])["conns"] == before["conns"]


def test_tcpcp_pass_resumes_connections_on_origin_when_the_switch_fails(
    lab: Lab, servers: dict[str, str],
) -> None:
    socks = open_echo(lab, 4, 3)
    with EchoPeers(socks) as peers:
        time.sleep(0.2)
        done = pass_cli("--control", servers["origin"],
                        "--to", f"{lab.addr('standby', 4)}:{RECEIVE_PORT}",
                        "--switch-cmd", "exit 3")
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        report = last_report(done)
        assert report["event"] == "failed"
        assert "--switch-cmd: expected exit status 0, got 3" in report["error"]
        assert "resumed here" in report["origin"]["error"]
        time.sleep(0.3)
        assert status(servers["standby"])["conns"] == 0
        assert status(servers["origin"])["conns"] >= 3
        mid = list(peers.sent)
        time.sleep(0.3)
        assert peers.finish()
    assert_kept_flowing(peers, mid)
    for s in socks:
        s.close()


def test_connections_passed_back_and_forth_faster_than_the_isolation_grace_keep_flowing(
    lab: Lab, servers: dict[str, str],
) -> None:
    socks = open_echo(lab, 4, 2)
    with EchoPeers(socks) as peers:
        for src, dst in [("origin", "standby"), ("standby", "origin")] * 2:
            time.sleep(0.2)
            assert tcpcp_pass(lab, servers[src], dst, 4)["passed"] == 2
        mid = list(peers.sent)
        time.sleep(1.5)  # past every grace timer: none may cut the live flows
        assert peers.finish()
    assert peers.errors == {}
    assert all(a > m + 10_000 for a, m in zip(peers.sent, mid, strict=True))
    for s in socks:
        s.close()


def test_connections_the_destination_refuses_stay_on_origin_and_keep_flowing(
    lab: Lab, servers: dict[str, str],
) -> None:
    served = open_echo(lab, 4, 2)
    with lab.enter("peer"):
        own = [socket.create_connection((lab.addr("origin", 4), SERVICE_PORT), timeout=10)]
    with EchoPeers(served + own) as peers:
        time.sleep(0.3)
        report = tcpcp_pass(lab, servers["origin"], "standby", 4)
        assert report["passed"] == 2
        assert len(report["refused"]) == 1
        assert "10.77.2.10 is not an address this host serves" in report["refused"][0][1]
        assert status(servers["origin"])["conns"] == 1
        mid = list(peers.sent)
        back = tcpcp_pass(lab, servers["standby"], "origin", 4)
        assert back["passed"] == 2
        time.sleep(0.3)
        assert peers.finish()
    assert_kept_flowing(peers, mid)
    for s in served + own:
        s.close()


def test_a_garbled_transfer_is_refused_and_the_receiver_keeps_serving(
    lab: Lab, servers: dict[str, str],
) -> None:
    before = status(servers["standby"])
    with lab.enter("origin"):
        for junk in (b"\x00\x00\x00\x10" + b"TCPP" + bytes(12),  # right size, bad checksum
                     b"\x00\x00\x00\x04TCP"):                   # truncated
            with socket.create_connection((lab.addr("standby", 4), RECEIVE_PORT), timeout=5) as c:
                c.sendall(junk)
                c.shutdown(socket.SHUT_WR)
                assert c.recv(100) == b""  # closed without restoring anything
    with lab.enter("origin"), socket.create_connection(
            (lab.addr("standby", 4), RECEIVE_PORT), timeout=5) as c:
        c.sendall(struct.pack("!I", MAX_BATCH_BYTES + 1))  # announces too much: not waited for
        assert c.recv(100) == b""
    after = status(servers["standby"])
    assert after["conns"] == before["conns"]


def handmade_ici(lab: Lab, family: int, peer_port: int) -> Ici:
    """A sane ICI of a connection service:8080 -> peer:peer_port (nothing on the wire has it)."""
    return Ici(
        identity=Identity(Family(family), ipaddress.ip_address(lab.service(family)).packed,
                          SERVICE_PORT, ipaddress.ip_address(lab.addr("peer", family)).packed,
                          peer_port),
        state=TcpState.ESTABLISHED,
        params=Params(1448, 7, 7, TcpOption.TIMESTAMPS | TcpOption.SACK | TcpOption.WSCALE),
        snd_una=1000, rcv_nxt=5000,
        window=Window(snd_wl1=5000, snd_wnd=64000, max_window=64000, rcv_wnd=64000,
                      rcv_wup=5000),
        timestamp=Timestamp(123456, time.time_ns() // 1_000_000),
    )


def send_batch(lab: Lab, items: list[Handoff]) -> bytes:
    """Offer a batch to standby's receiver as an origin would; returns its answer line (b""
    if it hung up) and aborts the pass."""
    batch = encode_batch(items)
    with lab.enter("origin"):
        ctl = socket.create_connection((lab.addr("standby", 4), RECEIVE_PORT), timeout=10)
    with ctl:
        ctl.sendall(struct.pack("!I", len(batch)) + batch)
        answer = ctl.makefile("rb").readline()
        if answer:
            ctl.sendall(ABORT)
            assert ctl.recv(100) == b""  # the receiver discarded everything and hung up
    return answer


@pytest.mark.parametrize("family", [4, 6])
def test_forged_icis_offered_to_the_receiver_are_refused_each_naming_its_fault(
    lab: Lab, servers: dict[str, str], family: int,
) -> None:
    before = status(servers["standby"])
    good = handmade_ici(lab, family, 45000 + family)
    w = good.window
    forged = [
        dataclasses.replace(good, params=dataclasses.replace(good.params, rcv_wscale=15)),
        dataclasses.replace(good, window=dataclasses.replace(w, max_window=w.snd_wnd - 1)),
        dataclasses.replace(good, window=dataclasses.replace(w, rcv_wup=good.rcv_nxt + 1)),
        dataclasses.replace(good, identity=dataclasses.replace(
            good.identity, local_addr=ipaddress.ip_address(lab.addr("origin", family)).packed)),
    ]
    report = RestoreReport.from_json(send_batch(lab, [Handoff(f) for f in [good, *forged]]))
    assert report.restored == (0,)  # control: the sane one was restored (then aborted)
    reasons = dict(report.refused)
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "rcv_wscale: expected at most 14, got 15" in reasons[1]
    assert f"max_window: expected at least snd_wnd ({w.snd_wnd})" in reasons[2]
    assert f"rcv_wup: expected at or before rcv_nxt ({good.rcv_nxt})" in reasons[3]
    assert f"{lab.addr('origin', family)} is not an address this host serves" in reasons[4]

    raw = bytearray(codec.encode(good))  # an ICI of a version this receiver does not know
    raw[4:6] = struct.pack("!H", codec.VERSION + 1)
    raw[-4:] = struct.pack("!I", zlib.crc32(raw[:-4]))
    batch = bytearray(encode_batch([Handoff(good)]))
    batch[10 : 14 + len(raw)] = struct.pack("!I", len(raw)) + raw
    batch[-4:] = struct.pack("!I", zlib.crc32(batch[:-4]))
    with pytest.raises(codec.IciDecodeError, match="version: expected 1, got 2"):
        decode_batch(bytes(batch))  # what the receiver meets
    with lab.enter("origin"):
        ctl = socket.create_connection((lab.addr("standby", 4), RECEIVE_PORT), timeout=10)
    with ctl:
        ctl.sendall(struct.pack("!I", len(batch)) + batch)
        assert ctl.makefile("rb").readline() == b""  # refused whole: no report, hung up
    assert status(servers["standby"])["conns"] == before["conns"]
    left = lab.run("standby", ["ss", "-Htan", f"dport = :{45000 + family}"],
                   capture_output=True, text=True, check=True).stdout.strip()
    assert left == "", f"the aborted restore left a socket: {left}"


def test_passing_isolated_by_nftables_instead_of_the_gate_keeps_every_byte(
    lab: Lab, tmp_path: Path, servers: dict[str, str],
) -> None:
    """The fallback isolation (no BPF): nftables drops; the module's gate servers still run."""
    port, receive_port = SERVICE_PORT + 1, RECEIVE_PORT + 1
    with demo_servers(lab, tmp_path, port=port, receive_port=receive_port, isolation="nft",
                      own_address=True, log_level="info") as controls:
        cap = Capture(lab, tmp_path / "peer.pcap", port)
        try:
            socks = open_echo(lab, 4, 3, port)
            with EchoPeers(socks) as peers:
                for src, dst in (("origin", "standby"), ("standby", "origin")):
                    time.sleep(0.4)
                    assert tcpcp_pass(lab, controls[src], dst, 4, receive_port)["passed"] == 3
                mid = list(peers.sent)
                time.sleep(0.4)
                assert peers.finish()
            assert_kept_flowing(peers, mid)
            assert status(controls["origin"])["errors"] == 0
            for s in socks:
                s.close()
        finally:
            _, resets = cap.stop()
    assert resets == 0
    for host in ("origin", "standby"):  # nftables, not the gate, held these flows
        events = [json.loads(line)["event"] for line in
                  (tmp_path / f"{host}.log").read_text().splitlines() if line.startswith("{")]
        assert events.count("passed") + events.count("pass_received") >= 1, host
        assert events.count("flow_frozen") == 0, host


def test_the_clock_check_flags_a_microsecond_clock_and_data_behind_but_not_late_acks() -> None:
    """Control for clock_faults: what a restore of the wrong TCP_TIMESTAMP parity did (TSval
    1,000 times too fast) and a data segment behind are flagged; a late pure ACK is not."""
    def seg(at: float, tsval: int, payload: int = 0, port: int = 40000) -> Segment:
        return Segment(at, SERVICE_PORT, port, 0x10, payload, tsval, frozenset({8}))

    good = [seg(0.0, 1000), seg(0.1, 1100, 200), seg(0.1005, 1098), seg(0.2, 1200, 200)]
    assert clock_faults(good) == []
    fast = [seg(0.0, 1000), seg(0.1, 1000 + 100_000, 200)]
    assert clock_faults(fast) == ["port 40000: TSval ran 100000 in 0.100 s"]
    late_data = [seg(0.0, 1000), seg(0.1, 1100, 200), seg(0.11, 1095, 100)]
    assert clock_faults(late_data) == ["port 40000: data with TSval 1095, 5 behind"]


def test_resets_after_a_fin_are_counted_apart_from_resets_of_open_connections() -> None:
    def seg(at: float, flags: int, port: int, from_server: bool = True) -> Segment:
        ports = (SERVICE_PORT, port) if from_server else (port, SERVICE_PORT)
        return Segment(at, *ports, flags, 0, None, frozenset())

    closing = [seg(0.0, 0x10, 1), seg(0.1, 0x11, 1, from_server=False), seg(0.2, 0x04, 1)]
    assert resets_before_close(closing) == 0
    assert resets_before_close([seg(0.0, 0x10, 2), seg(0.1, 0x04, 2), *closing]) == 1


def test_the_capture_check_sees_a_reset_when_there_is_one(lab: Lab, tmp_path: Path) -> None:
    """Control for the no-RST checks: a connection refused by origin shows up as one RST."""
    cap = Capture(lab, tmp_path / "rst.pcap", port=9)
    with lab.enter("peer"), pytest.raises(ConnectionRefusedError):
        socket.create_connection((lab.service(4), 9), timeout=5)
    segments, resets = cap.stop()
    assert segments == 2
    assert resets == 1
