"""The passing receiver and the control socket under hostile input, in the lab.

Each bad input is refused with an error naming what was expected, while connections already
live on the receiving host keep flowing, and a real pass right after it still works. The peer's
capture shows no RST over the whole module."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel import channel, codec, transfer
from kernel.ici import Family, Ici, Identity, Params, TcpOption, TcpState, Timestamp, Window
from kernel.transfer import Envelope, Frame, Item, Kind, Limits, TransferError
from ops.apps.demo_server import AppState, EchoPeers
from ops.capture import RST, Capture
from ops.demo import RECEIVE_PORT, SERVICE_PORT, demo_servers
from ops.lab import Lab
from ops.passcli import LabSwitch, pass_connections, request
from ops.wait import wait_until
from store.signing import KeyRing, load_keyring

pytestmark = pytest.mark.lab

LIMITS = Limits()


@pytest.fixture(scope="module")
def servers(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("hostile")
    with demo_servers(lab, tmp, log_level="info", extra=["--transfer-timeout", "2"]) as controls:
        controls["keys"] = str(tmp / "keys.json")
        yield controls
    lab.unswitch_flows()


@pytest.fixture(scope="module")
def live(lab: Lab, servers: dict[str, str]) -> Iterator[EchoPeers]:
    """Echo connections passed to standby (the receiver under attack) and kept flowing there
    for the whole module; the peer's capture over all of it shows no RST."""
    cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {SERVICE_PORT}", snaplen=96).start()
    with lab.enter("peer"):
        socks = [socket.create_connection((lab.service(4), SERVICE_PORT), timeout=10)
                 for _ in range(4)]
    with EchoPeers(socks) as peers:
        keep_flowing(peers)
        report = real_pass(lab, servers, "origin", "standby")
        assert report["passed"] == 4, report
        yield peers
        assert peers.finish(timeout_s=30)
    assert peers.errors == {}
    for s in socks:
        s.close()
    cap.stop()
    resets = [s for s in cap.segments() if s.flags & RST]
    assert resets == [], f"the peer saw {len(resets)} RST"


def keep_flowing(peers: EchoPeers) -> None:
    mark = list(peers.received)
    wait_until(lambda: peers.errors or all(r > m for r, m in zip(peers.received, mark,
                                                                  strict=True)),
               15, what="the live connections carrying data")
    assert peers.errors == {}


def real_pass(lab: Lab, servers: dict[str, str], src: str, dst: str) -> dict[str, Any]:
    return pass_connections(servers[src], f"{lab.addr(dst, 4)}:{RECEIVE_PORT}", dst,
                            LabSwitch(lab, src, dst))


def a_fresh_pass_still_works(lab: Lab, servers: dict[str, str]) -> None:
    """One new connection passed origin -> standby and back, carrying data throughout."""
    before = request(servers["standby"], {"cmd": "status"})["conns"]
    with lab.enter("peer"):
        s = socket.create_connection((lab.service(4), SERVICE_PORT), timeout=10)
    with EchoPeers([s]) as peer:
        keep_flowing(peer)
        there = real_pass(lab, servers, "origin", "standby")  # passes only the new one
        assert there["passed"] == 1, there
        keep_flowing(peer)
        assert request(servers["standby"], {"cmd": "status"})["conns"] == before + 1
        assert peer.finish(timeout_s=20)
    assert peer.errors == {}
    s.close()


def transfer_socket(lab: Lab) -> socket.socket:
    with lab.enter("origin"):
        return socket.create_connection((lab.addr("standby", 4), RECEIVE_PORT), timeout=10)


def refused_count(servers: dict[str, str]) -> int:
    return int(request(servers["standby"], {"cmd": "status"})["transfers_refused"])


def handmade_ici(lab: Lab, peer_port: int, family: int = 4) -> Ici:
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


def envelope(destination: str = "standby", origin: str = "origin", key_id: str = "lab"
             ) -> Envelope:
    return Envelope(key_id, origin, destination, 0, os.urandom(16), time.time_ns() // 1_000_000)


def offer(lab: Lab, data: bytes, ring: KeyRing, env: Envelope) -> Frame | str:
    """Offer a frame to standby's receiver as an origin would: its REPORT (after which the pass
    is aborted), or the reason the receiver hung up."""
    with transfer_socket(lab) as ctl:
        ctl.sendall(data)
        try:
            report = channel.recv_frame(ctl, Kind.REPORT, ring, LIMITS, timeout_s=10)
        except TransferError as exc:
            return str(exc)
        channel.send_frame(ctl, transfer.encode(
            Frame(Kind.ABORT, env.reply(time.time_ns() // 1_000_000), reason="test"), ring))
        assert ctl.recv(100) == b""  # the receiver discarded everything and hung up
        return report


def refused_whole(lab: Lab, servers: dict[str, str], data: bytes, ring: KeyRing,
                  env: Envelope) -> None:
    before = refused_count(servers)
    answer = offer(lab, data, ring, env)
    assert isinstance(answer, str) and "closed" in answer, answer
    wait_until(lambda: refused_count(servers) == before + 1, 10, what="the refusal counted")


@pytest.mark.parametrize("junk", [
    pytest.param(os.urandom(200), id="garbage"),
    pytest.param(transfer.HEADER.pack(transfer.MAGIC, 1, Kind.BATCH, 0, 1000) + b"x" * 10,
                 id="truncated"),
    pytest.param(transfer.HEADER.pack(transfer.MAGIC, 1, Kind.BATCH, 0, 1 << 31),
                 id="oversized-length"),
    pytest.param(transfer.HEADER.pack(transfer.MAGIC, 1, Kind.REPORT, 0, 100) + bytes(100),
                 id="wrong-kind"),
])
def test_malformed_transfers_are_refused_while_live_connections_flow(
    lab: Lab, servers: dict[str, str], live: EchoPeers, junk: bytes,
) -> None:
    before = refused_count(servers)
    with transfer_socket(lab) as ctl:
        ctl.sendall(junk)
        # hung up without restoring anything (RST when our bytes were left unread; on a loaded
        # machine the refusal can come before our shutdown: ENOTCONN)
        with contextlib.suppress(ConnectionResetError, OSError):
            ctl.shutdown(socket.SHUT_WR)
            assert ctl.recv(100) == b""
    wait_until(lambda: refused_count(servers) == before + 1, 10, what="the refusal counted")
    keep_flowing(live)
    a_fresh_pass_still_works(lab, servers)


def test_a_header_trickled_a_byte_at_a_time_is_cut_at_the_deadline_and_holds_no_one(
    lab: Lab, servers: dict[str, str], live: EchoPeers,
) -> None:
    before = refused_count(servers)
    head = transfer.HEADER.pack(transfer.MAGIC, 1, Kind.BATCH, 0, 1000)
    cut = threading.Event()

    def trickle() -> None:
        with transfer_socket(lab) as ctl:
            for b in head:
                try:
                    ctl.sendall(bytes([b]))
                except OSError:
                    break
                if cut.wait(0.5):
                    break
            ctl.settimeout(10)
            try:
                if ctl.recv(100) == b"":
                    cut.set()
            except OSError:
                cut.set()

    t = threading.Thread(target=trickle)
    t.start()
    try:
        a_fresh_pass_still_works(lab, servers)  # while the trickle goes on
        keep_flowing(live)
        wait_until(cut.is_set, 15, what="the trickling sender cut off")
    finally:
        cut.set()
        t.join(20)
    assert not t.is_alive()
    assert refused_count(servers) == before + 1


def test_signed_batches_the_receiver_must_refuse_are_each_refused_naming_the_fault(
    lab: Lab, servers: dict[str, str], live: EchoPeers,
) -> None:
    ring = load_keyring(servers["keys"])
    good = handmade_ici(lab, 45004)
    ok = AppState().encode()

    # a forged signature, an unknown origin and another destination: refused whole
    forger = KeyRing("lab", {"lab": os.urandom(32)})
    env = envelope()
    refused_whole(lab, servers, transfer.batch([(good, b"{}")], env, forger), forger, env)
    for env in (envelope(origin="mallory"), envelope(destination="elsewhere")):
        refused_whole(lab, servers, transfer.batch([(good, b"{}")], env, ring), ring, env)

    # a replayed batch: the first is answered, the same bytes again are refused
    env = envelope()
    data = transfer.batch([(good, ok)], env, ring)
    first = offer(lab, data, ring, env)
    assert isinstance(first, Frame) and first.outcome is not None, first
    refused_whole(lab, servers, data, ring, env)

    # per connection: out-of-range fields, an address not served, state that is not JSON
    w = good.window
    items = [
        (good, b"not json"),
        (dataclasses.replace(good, params=dataclasses.replace(good.params, rcv_wscale=15)), ok),
        (dataclasses.replace(good, window=dataclasses.replace(w, max_window=w.snd_wnd - 1)), ok),
        (dataclasses.replace(good, identity=dataclasses.replace(
            good.identity, local_addr=ipaddress.ip_address(lab.addr("origin", 4)).packed)), ok),
    ]
    env = envelope()
    report = offer(lab, transfer.batch(items, env, ring), ring, env)
    assert isinstance(report, Frame) and report.outcome is not None, report
    reasons = dict(report.outcome.failed)
    assert report.outcome.ok == ()
    assert sorted(reasons) == [0, 1, 2, 3]
    assert "application state refused" in reasons[0]
    assert "rcv_wscale: expected at most 14, got 15" in reasons[1]
    assert f"max_window: expected at least snd_wnd ({w.snd_wnd})" in reasons[2]
    assert f"{lab.addr('origin', 4)} is not an address this host serves" in reasons[3]

    # an ICI of a version this receiver does not know, inside a well-signed batch
    raw = bytearray(codec.encode(good))
    raw[4:6] = (codec.VERSION + 1).to_bytes(2, "big")
    env = envelope()
    report = offer(lab, transfer.encode(Frame(Kind.BATCH, env, (Item(bytes(raw), b"{}"),)),
                                        ring), ring, env)
    assert isinstance(report, Frame) and report.outcome is not None
    assert "version" in dict(report.outcome.failed)[0]

    left = lab.run("standby", ["ss", "-Htan", "dport = :45004"], capture_output=True,
                   text=True, check=True).stdout.strip()
    assert left == "", f"an aborted restore left a socket: {left}"
    keep_flowing(live)
    a_fresh_pass_still_works(lab, servers)


def control(path: str, payload: bytes, timeout: float = 15) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        return dict(json.loads(s.makefile("rb").readline()))


@pytest.mark.parametrize(("payload", "expected"), [
    (b"[]\n", "expected a JSON object, got list"),
    (b"not json\n", "expected a JSON object"),
    (b'{"cmd": "dance"}\n', 'expected "cmd" status, pass or fault'),
    (b'{"cmd": "pass", "to": "10.0.0.1:99999", "to_name": "x"}\n', "port 1..65535"),
    (b'{"cmd": "pass", "to": "10.0.0.1:7070"}\n', 'expected "to_name"'),
    (b'{"cmd": "pass", "to": "10.0.0.1:7070", "to_name": "x", "count": -1}\n',
     'expected "count" as an integer >= 0'),
    (b'{"cmd": "pass", "to": "10.0.0.1:7070", "to_name": "x", "fault": {"step": "dump"}}\n',
     "fault injection is off"),
    (b"x" * 100_000, "at most 65536 bytes"),
])
def test_malformed_control_requests_get_an_error_and_the_server_keeps_serving(
    lab: Lab, servers: dict[str, str], live: EchoPeers, payload: bytes, expected: str,
) -> None:
    reply = control(servers["origin"], payload)
    assert reply["event"] == "error" and expected in reply["error"], reply
    assert request(servers["origin"], {"cmd": "status"})["event"] == "status"
    keep_flowing(live)


def test_a_silent_control_client_does_not_hold_the_others(
    servers: dict[str, str], live: EchoPeers,
) -> None:
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(servers["origin"])
        silent.sendall(b'{"cmd": "sta')
        assert request(servers["origin"], {"cmd": "status"})["event"] == "status"
        keep_flowing(live)


def test_the_control_socket_is_private_and_checks_the_clients_uid(
    lab: Lab, servers: dict[str, str], live: EchoPeers,
) -> None:
    path = servers["origin"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # let another uid reach it (the socket and the test's private directories on the way):
    # SO_PEERCRED must still refuse it
    opened = [(d, os.stat(d).st_mode) for d in Path(path).parents
              if not os.stat(d).st_mode & stat.S_IXOTH]
    for d, mode in opened:
        os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
    os.chmod(path, 0o666)
    try:
        # the server answers a refused uid at once and hangs up: the request may meet EPIPE
        probe = ("import contextlib, socket; s = socket.socket(socket.AF_UNIX); "
                 f"s.connect({path!r})\nwith contextlib.suppress(BrokenPipeError): "
                 "s.sendall(b'{\"cmd\": \"status\"}\\n')\n"
                 "print(s.makefile('rb').readline().decode())")
        done = subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True, text=True,
                              timeout=30, user=65534, group=65534, extra_groups=[], check=False)
    finally:
        os.chmod(path, 0o600)
        for d, mode in opened:
            os.chmod(d, stat.S_IMODE(mode))
    assert done.stdout, done.stderr
    reply = json.loads(done.stdout)
    assert reply["event"] == "error" and "uid 65534 may not use" in reply["error"], done
    assert request(path, {"cmd": "status"})["refused_requests"] >= 1


def test_the_server_refuses_to_replace_a_control_path_it_does_not_own(
    lab: Lab, servers: dict[str, str], tmp_path: Path,
) -> None:
    victim = tmp_path / "precious"
    victim.write_text("do not unlink me")
    done = lab.run("origin", [
        sys.executable, "-m", "ops.apps.demo_server", "--name", "x", "--keys", servers["keys"],
        "--listen", lab.addr("origin", 4), "--port", "18080", "--control", str(victim),
        "--isolation", "nft"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "exists and is not a socket" in done.stderr
    assert victim.read_text() == "do not unlink me"
