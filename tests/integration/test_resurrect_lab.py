"""A crash of the origin, survived: an upload whose application commits through the checkpointer
agent, the origin crashed from outside (the lab's crash: cut at the gateway, then every process
killed), the lease seen expired and the origin claimed (epoch bump), and the connection
resurrected on the standby (resurrector/resurrect.py) from its last checkpoint. Checked on the
peer: no RST, no PAWS drop, the uploader's socket kept, every byte delivered once."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kernel.sanity import RestorePolicy
from ops import gatelab as G
from ops.agentlab import AgentProcess, write_keys
from ops.apps.sink import finish
from ops.capture import Capture
from ops.failoverlab import ResurrectorProcess, switch_command
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from resurrector.planner import Output
from resurrector.resurrect import Resurrected, resurrect
from store.client import CheckpointStore, OriginState
from store.config import StoreConfig
from store.errors import StaleEpoch
from store.record import Checkpoint
from store.signing import load_keyring

RST = 0x04
PORT = 5501
TOTAL = 12_000_000


def _stream(total: int) -> bytes:
    """What ops.gatelab's uploader sends."""
    block = bytes(range(256)) * 256
    out, sent, i = [], 0, 0
    while sent < total:
        chunk = block[i % 251:][: min(65536 - i % 251, total - sent)]
        out.append(chunk)
        sent += len(chunk)
        i += 1
    return b"".join(out)


@pytest.mark.parametrize("family", [4, 6])
def test_an_upload_crashed_mid_way_is_resurrected_with_every_byte_once(
        fresh_lab: Lab, tmp_path: Path, family: int) -> None:
    lab = fresh_lab
    redis = RedisServer(lab, "store", 6413).start()
    keys = write_keys(tmp_path / "keys.json")
    origin = "up1"
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[PORT],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    cap = None
    try:
        agent.start()
        app_log = tmp_path / "sink.log"
        with app_log.open("wb") as out:
            listen = f"0.0.0.0:{PORT}" if family == 4 else f"[::]:{PORT}"
            lab.popen("origin", [sys.executable, "-m", "ops.apps.sink", "--listen", listen,
                                 "--checkpointer", str(agent.socket_path), "--think-ms", "3"],
                      stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "listening" in app_log.read_text(), 30, what="the sink listening")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis.url),
                         load_keyring(keys))
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {PORT}",
                             path=tmp_path / "peer.pcap", snaplen=128).start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        uploader = lab.popen("peer", G.uploader_argv(lab.service(family), PORT, TOTAL),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def records() -> list[Checkpoint]:
            return [r.checkpoint for r in store.records(origin) if r.checkpoint is not None]

        def committed() -> int:
            return max((cp.inbound_consumed for cp in lab.call("standby", records)), default=0)
        wait_until(lambda: committed() > 2_000_000, 60, what="2 MB committed on the origin")
        lab.crash("origin")

        # the standby: the lease runs out, the origin is claimed, its records are read
        def expired() -> OriginState | None:
            s = lab.call("standby", store.state, origin)
            return s if s.lease_ms_left is None else None
        state = wait_until(expired, 10, what="the origin's lease expired")
        assert state is not None
        epoch = lab.call("standby", store.claim, origin, "standby", state.epoch, 5000)
        assert epoch == state.epoch + 1
        checkpoints = lab.call("standby", records)
        assert len(checkpoints) == 1
        results = lab.call("standby", lambda: resurrect(
            checkpoints, ifname="eth0", policy=RestorePolicy.serving(lab.service(family)),
            take_over=lambda: lab.switch_route("standby"),
            outputs=lambda cp: Output.REGENERABLE))
        assert [type(r) for r in results] == [Resurrected], results
        r = results[0]
        assert isinstance(r, Resurrected)
        got = bytearray()
        n = lab.call("standby", lambda: _finish(r.sock, got))
        _, err = uploader.communicate(timeout=120)
        # the dead origin's late write is refused: fenced by the claim
        fenced = False
        try:
            lab.call("standby", store.delete, origin, state.epoch, [r.conn])
        except StaleEpoch:
            fenced = True
        lab.call("standby", store.close)
    finally:
        if cap is not None:
            cap.stop()
        agent.close()
    assert uploader.returncode == 0, err
    stream = _stream(TOTAL)
    consumed = r.checkpoint.inbound_consumed
    assert 0 < consumed < TOTAL
    assert n == TOTAL - consumed and bytes(got) == stream[consumed:]
    assert uploader.stdout is not None
    assert uploader.returncode == 0
    assert fenced
    assert [s for s in cap.segments() if s.flags & RST] == []
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before
    assert hashlib.sha256(stream).hexdigest() == G.expected_sha256(TOTAL)


def _finish(sock: object, got: bytearray) -> int:
    assert isinstance(sock, socket.socket)
    sock.settimeout(60)
    return finish(sock, got.extend)


def test_the_resurrector_daemon_takes_a_crashed_origin_over_and_hands_the_upload_on(
        fresh_lab: Lab, tmp_path: Path) -> None:
    """The same crash, end to end through the daemons: the resurrector (a process on the
    standby) sees the lease expire, claims, quarantines, switches the route through its
    operator hook (`tcpcp lab switch`), probes, restores, and hands the connection to the
    standby's sink (`python -m ops.apps.sink --adopt`), which reads it to the end."""
    lab = fresh_lab
    redis = RedisServer(lab, "store", 6414).start()
    keys = write_keys(tmp_path / "keys.json")
    origin, port = "up2", PORT + 1
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    handover = agent.socket_path.parent / "handover.sock"
    logs = {"sink": tmp_path / "sink.log"}
    cap = None
    try:
        agent.start()
        # two resurrectors race for the origin (two holders on the standby host): exactly one
        # may claim it and restore; the other must stand down
        for n, name in enumerate(("r1", "r2")):
            sock = handover.parent / f"{name}.sock"
            ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                               log=tmp_path / f"{name}.log", serve=[lab.service(4)],
                               extra=["--name", name,
                                      "--takeover-cmd", switch_command(lab, "standby"),
                                      "--handover-socket", str(sock),
                                      "--metrics-address", f"127.0.0.1:{9481 + n}"]).start()
            with (tmp_path / f"adopter-{name}.log").open("wb") as out:
                lab.popen("standby", [sys.executable, "-m", "ops.apps.sink", "--adopt",
                                      str(sock)], stdout=out, stderr=subprocess.STDOUT,
                          env=dict(os.environ, TCPCP_LOG_FORMAT="json"))
        with logs["sink"].open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.sink", "--listen",
                                 f"0.0.0.0:{port}", "--checkpointer", str(agent.socket_path),
                                 "--think-ms", "3"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "listening" in logs["sink"].read_text(), 30, what="the sink")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis.url),
                         load_keyring(keys))
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {port}",
                             path=tmp_path / "peer.pcap", snaplen=128).start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        uploader = lab.popen("peer", G.uploader_argv(lab.service(4), port, TOTAL),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def committed() -> int:
            return max((r.checkpoint.inbound_consumed for r in lab.call(
                "standby", lambda: list(store.records(origin))) if r.checkpoint), default=0)
        wait_until(lambda: committed() > 2_000_000, 60, what="2 MB committed on the origin")
        lab.crash("origin")
        out_text, err = uploader.communicate(timeout=120)
        lab.call("standby", store.close)
        wait_until(lambda: any('"finished"' in (tmp_path / f"adopter-{n}.log").read_text()
                               for n in ("r1", "r2")), 30,
                   what="the standby's sink finished the adopted upload")
        winner = next(n for n in ("r1", "r2")
                      if _events(tmp_path / f"{n}.log", "failover_timeline"))
        loser = "r2" if winner == "r1" else "r1"
        scraped = {name: lab.call("standby", _scrape, 9481 + n)
                   for n, name in enumerate(("r1", "r2"))}
    finally:
        if cap is not None:
            cap.stop()
        agent.close()
    assert uploader.returncode == 0, err + (tmp_path / "r1.log").read_text()[-3000:]
    assert out_text.strip() == G.expected_sha256(TOTAL)  # the peer's own digest of what it sent
    finished = _events(tmp_path / f"adopter-{winner}.log", "finished")
    assert [e["total"] for e in finished] == [TOTAL]
    assert 0 < finished[0]["consumed"] < TOTAL
    assert _events(tmp_path / f"adopter-{loser}.log", "adopted") == []
    assert _events(tmp_path / f"{loser}.log", "failover_timeline") == []
    # the other one either lost the claim (it saw the expiry too) or never saw the lease
    # expired (the winner's claim had made it live again)
    lost = _events(tmp_path / f"{loser}.log", "standing_down")
    saw = _events(tmp_path / f"{loser}.log", "lease_expired_seen")
    assert len(lost) == len(saw) <= 1, (lost, saw)
    timeline = _events(tmp_path / f"{winner}.log", "failover_timeline")
    assert len(timeline) == 1 and timeline[0]["resurrected"] == 1
    for step in ("claimed", "quarantined", "traffic_moved", "probed", "restored", "handed"):
        assert f"{step}_ms" in timeline[0], timeline[0]
        # the same timeline in the winner's metrics, in seconds
        assert scraped[winner][f'tcpcp_resurrector_last_failover_step_seconds{{origin="{origin}"'
                               f',step="{step}"}}'] == pytest.approx(
            timeline[0][f"{step}_ms"] / 1000)
    won = f'{{origin="{origin}",outcome="taken_over"}}'
    assert scraped[winner][f"tcpcp_resurrector_failovers_total{won}"] == 1
    assert scraped[winner][f'tcpcp_resurrector_connections_total{{origin="{origin}",'
                           'outcome="resurrected"}'] == 1
    assert f"tcpcp_resurrector_failovers_total{won}" not in scraped[loser]
    assert scraped[loser].get(f'tcpcp_resurrector_failovers_total{{origin="{origin}",'
                              'outcome="stood_down"}', 0) == len(lost)
    assert [s for s in cap.segments() if s.flags & RST] == []
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before


def _scrape(port: int) -> dict[str, float]:
    """A daemon's Prometheus samples ("name{labels}" -> value), from inside its host."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == name:
            out.append(doc)
    return out


MANY_CLIENT = r"""
import socket, sys, threading, time
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ok, bad = [], []
def one(i):
    try:
        s = socket.create_connection((host, port), timeout=120)
        chunk = bytes([i % 256]) * 16384
        sent = 0
        while sent < size:
            part = chunk[: min(len(chunk), size - sent)]
            s.sendall(part)
            sent += len(part)
            time.sleep(0.1)
        s.shutdown(socket.SHUT_WR)
        ok.append(s.recv(1) == b"k")
        s.close()
    except OSError as exc:
        bad.append(f"{i}: {exc}")
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"ok {sum(ok)} of {n}; errors {bad[:5]}")
sys.exit(0 if sum(ok) == n else 1)
"""


def test_two_hundred_connections_crashed_at_once_are_all_resurrected(
        fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    n, size = 200, 300_000
    redis = RedisServer(lab, "store", 6415).start()
    keys = write_keys(tmp_path / "keys.json")
    origin, port = "many", PORT + 2
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    handover = agent.socket_path.parent / "handover.sock"
    cap = None
    try:
        agent.start()
        ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                           log=tmp_path / "resurrector.log", serve=[lab.service(4)],
                           extra=["--takeover-cmd", switch_command(lab, "standby"),
                                  "--handover-socket", str(handover)]).start()
        with (tmp_path / "adopter.log").open("wb") as out:
            lab.popen("standby", [sys.executable, "-m", "ops.apps.sink", "--adopt",
                                  str(handover)], stdout=out, stderr=subprocess.STDOUT,
                      env=dict(os.environ, TCPCP_LOG_FORMAT="json"))
        with (tmp_path / "sink.log").open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.sink", "--listen",
                                 f"0.0.0.0:{port}", "--checkpointer", str(agent.socket_path)],
                      stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "listening" in (tmp_path / "sink.log").read_text(), 30,
                   what="the sink")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis.url),
                         load_keyring(keys))
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {port} and tcp[tcpflags] & "
                             "tcp-rst != 0", path=tmp_path / "peer-rst.pcap").start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        clients = lab.popen("peer", [sys.executable, "-c", MANY_CLIENT, lab.service(4),
                                     str(port), str(n), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def all_under_way() -> bool:
            cps = [r.checkpoint for r in lab.call("standby", lambda: list(store.records(origin)))
                   if r.checkpoint is not None]
            return len(cps) == n and all(cp.inbound_consumed > 30_000 for cp in cps)
        wait_until(all_under_way, 60, what=f"{n} connections committing on the origin")
        lab.crash("origin")
        out_text, err = clients.communicate(timeout=180)
        lab.call("standby", store.close)
        wait_until(lambda: len(_events(tmp_path / "adopter.log", "finished")) >= n, 60,
                   what=f"the standby finishing {n} connections")
    finally:
        if cap is not None:
            cap.stop()
        agent.close()
    assert clients.returncode == 0, out_text + err
    finished = _events(tmp_path / "adopter.log", "finished")
    assert sorted(e["total"] for e in finished) == [size] * n
    assert all(0 < e["consumed"] < size for e in finished)  # all crashed mid-way
    timeline = _events(tmp_path / "resurrector.log", "failover_timeline")
    assert len(timeline) == 1 and timeline[0]["resurrected"] == n, timeline
    assert cap.segments() == []  # no RST at all in the peer's namespace
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before


def test_a_zombie_origin_cut_from_the_store_is_silent_after_the_takeover(
        fresh_lab: Lab, tmp_path: Path) -> None:
    """The origin loses the store but not the peer: its agent freezes every flow before the
    lease can expire, the resurrector claims the origin and takes the connection over, and the
    zombie sends nothing more (capture on its gateway port) while the upload completes from the
    standby; once the store is back, the zombie's writes are refused (the epoch moved on)."""
    lab = fresh_lab
    redis = RedisServer(lab, "store", 6416).start()
    keys = write_keys(tmp_path / "keys.json")
    origin, port = "zombie", PORT + 3
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    handover = agent.socket_path.parent / "handover.sock"
    zombie_cap = peer_cap = None
    try:
        agent.start()
        ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                           log=tmp_path / "resurrector.log", serve=[lab.service(4)],
                           extra=["--takeover-cmd", switch_command(lab, "standby"),
                                  "--handover-socket", str(handover)]).start()
        with (tmp_path / "adopter.log").open("wb") as out:
            lab.popen("standby", [sys.executable, "-m", "ops.apps.sink", "--adopt",
                                  str(handover)], stdout=out, stderr=subprocess.STDOUT,
                      env=dict(os.environ, TCPCP_LOG_FORMAT="json"))
        with (tmp_path / "sink.log").open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.sink", "--listen",
                                 f"0.0.0.0:{port}", "--checkpointer", str(agent.socket_path),
                                 "--think-ms", "3"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "listening" in (tmp_path / "sink.log").read_text(), 30,
                   what="the sink")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis.url),
                         load_keyring(keys))
        zombie_cap = Capture.in_lab(lab, "gw", "p-origin", f"tcp port {port}", snaplen=128,
                                    path=tmp_path / "zombie.pcap").start()
        peer_cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {port}", snaplen=128,
                                  path=tmp_path / "peer.pcap").start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        uploader = lab.popen("peer", G.uploader_argv(lab.service(4), port, TOTAL),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def committed() -> int:
            return max((r.checkpoint.inbound_consumed for r in lab.call(
                "standby", lambda: list(store.records(origin))) if r.checkpoint), default=0)
        wait_until(lambda: committed() > 2_000_000, 60, what="2 MB committed on the origin")
        lab.partition("origin", ["store"])  # not from the peer: a zombie, not a crash
        wait_until(lambda: agent.events("flows_frozen"), 10, what="the zombie froze its flows")
        assert zombie_cap.flush()
        frozen_at = zombie_cap.mark()
        out_text, err = uploader.communicate(timeout=120)
        wait_until(lambda: _events(tmp_path / "adopter.log", "finished"), 30,
                   what="the standby finished the upload")
        assert zombie_cap.flush()
        from_zombie = [s for s in zombie_cap.segments(since=frozen_at) if s.sport == port]
        lab.heal("origin")
        # the store is back: the zombie's agent finds its origin claimed and stays frozen
        wait_until(lambda: agent.events("origin_taken_over"), 30,
                   what="the zombie's agent learning the origin was taken over")
        assert not agent.events("flows_thawed")

        def late_write() -> str:
            """What the zombie's store client gets for a write with its epoch (1)."""
            zombie = CheckpointStore.connect(StoreConfig(url=redis.url), load_keyring(keys))
            try:
                zombie.delete(origin, 1, ["any"])
                return "accepted"
            except StaleEpoch as exc:
                return str(exc)
            finally:
                zombie.close()
        refused = lab.call("origin", late_write)
        lab.call("standby", store.close)
    finally:
        for cap in (zombie_cap, peer_cap):
            if cap is not None:
                cap.stop()
        agent.close()
    assert uploader.returncode == 0, err
    assert out_text.strip() == G.expected_sha256(TOTAL)
    assert from_zombie == [], f"the zombie sent {len(from_zombie)} segments after its freeze"
    assert "fenced" in refused, refused
    assert [s for s in peer_cap.segments() if s.flags & RST] == []
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before


def test_a_curl_download_crashed_mid_way_resumes_from_the_standby_where_the_peer_is(
        fresh_lab: Lab, tmp_path: Path) -> None:
    """The HTTP file server (regenerable output: its state maps stream positions to file
    offsets) serves a rate-limited `curl` download; the origin is crashed with the peer ahead
    of the last checkpoint (commits every MiB); the standby's file server adopts the connection
    and writes the file on from the position the peer acknowledged. curl gets the file whole."""
    lab = fresh_lab
    redis = RedisServer(lab, "store", 6417).start()
    keys = write_keys(tmp_path / "keys.json")
    origin, port = "files", PORT + 4
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(24_000_000)
    (root / "big.bin").write_bytes(data)
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    handover = agent.socket_path.parent / "handover.sock"
    cap = None
    env = dict(os.environ, TCPCP_LOG_FORMAT="json")
    try:
        agent.start()
        ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                           log=tmp_path / "resurrector.log", serve=[lab.service(4)],
                           extra=["--takeover-cmd", switch_command(lab, "standby"),
                                  "--handover-socket", str(handover)]).start()
        with (tmp_path / "standby-files.log").open("wb") as out:
            lab.popen("standby", [sys.executable, "-m", "ops.apps.fileserver", "--root",
                                  str(root), "--adopt", str(handover)],
                      stdout=out, stderr=subprocess.STDOUT, env=env)
        with (tmp_path / "files.log").open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.fileserver", "--listen",
                                 f"0.0.0.0:{port}", "--root", str(root), "--checkpointer",
                                 str(agent.socket_path)], stdout=out, stderr=subprocess.STDOUT,
                      env=env)
        wait_until(lambda: '"listening"' in (tmp_path / "files.log").read_text(), 30,
                   what="the file server listening")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis.url),
                         load_keyring(keys))
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {port}", snaplen=96,
                             path=tmp_path / "peer.pcap").start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        got = tmp_path / "got.bin"
        curl = lab.popen("peer", ["curl", "-sS", "--fail", "--limit-rate", "4M", "-o", str(got),
                                  f"http://{lab.service(4)}:{port}/big.bin"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def produced() -> int:
            return max((r.checkpoint.outbound_produced for r in lab.call(
                "standby", lambda: list(store.records(origin))) if r.checkpoint), default=0)
        wait_until(lambda: produced() > 6_000_000, 60, what="6 MB served and committed")
        lab.crash("origin")
        _, err = curl.communicate(timeout=120)
        lab.call("standby", store.close)
    finally:
        if cap is not None:
            cap.stop()
        agent.close()
    assert curl.returncode == 0, err + (tmp_path / "resurrector.log").read_text()[-2000:]
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()
    resumed = _events(tmp_path / "standby-files.log", "response_resumed")
    assert len(resumed) == 1 and 0 < resumed[0]["from_offset"] < len(data)
    timeline = _events(tmp_path / "resurrector.log", "failover_timeline")
    assert len(timeline) == 1 and timeline[0]["resurrected"] == 1, timeline
    assert [s for s in cap.segments() if s.flags & RST] == []
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before


def test_a_redis_cli_incr_session_crashed_between_request_and_reply_counts_exactly_once(
        fresh_lab: Lab, tmp_path: Path) -> None:
    """The key-value server (logged output: every reply checkpointed before it is written)
    serves a redis-cli session sending one INCR every 10 ms; the origin is crashed mid-way,
    with requests sent and replies logged but not all delivered. The standby's key-value server
    adopts the connection (the resurrector re-queues the replies the peer lacks from the output
    log); redis-cli sees 1, 2, ..., N: no INCR lost, none applied twice."""
    lab = fresh_lab
    n = 400
    redis = RedisServer(lab, "store", 6418).start()
    keys = write_keys(tmp_path / "keys.json")
    origin, port = "kv", PORT + 5
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    handover = agent.socket_path.parent / "handover.sock"
    cap = None
    env = dict(os.environ, TCPCP_LOG_FORMAT="json")
    try:
        agent.start()
        ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                           log=tmp_path / "resurrector.log", serve=[lab.service(4)],
                           extra=["--takeover-cmd", switch_command(lab, "standby"),
                                  "--handover-socket", str(handover)]).start()
        with (tmp_path / "standby-kv.log").open("wb") as out:
            lab.popen("standby", [sys.executable, "-m", "ops.apps.kvserver", "--adopt",
                                  str(handover)], stdout=out, stderr=subprocess.STDOUT, env=env)
        with (tmp_path / "kv.log").open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.kvserver", "--listen",
                                 f"0.0.0.0:{port}", "--checkpointer", str(agent.socket_path)],
                      stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: '"listening"' in (tmp_path / "kv.log").read_text(), 30,
                   what="the key-value server listening")
        store = lab.call("standby", CheckpointStore.connect, StoreConfig(url=redis.url),
                         load_keyring(keys))
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {port}", snaplen=96,
                             path=tmp_path / "peer.pcap").start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        cli = lab.popen("peer", ["redis-cli", "-h", lab.service(4), "-p", str(port), "-r",
                                 str(n), "-i", "0.01", "INCR", "counter"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def produced() -> int:
            return max((r.checkpoint.outbound_produced for r in lab.call(
                "standby", lambda: list(store.records(origin))) if r.checkpoint), default=0)
        wait_until(lambda: produced() > 600, 60, what="about 100 INCRs answered")
        lab.crash("origin")
        out_text, err = cli.communicate(timeout=120)
        lab.call("standby", store.close)
    finally:
        if cap is not None:
            cap.stop()
        agent.close()
    assert cli.returncode == 0, err + (tmp_path / "resurrector.log").read_text()[-2000:]
    assert out_text.split() == [str(i) for i in range(1, n + 1)]  # exactly once, in order
    adopted = _events(tmp_path / "standby-kv.log", "adopted")
    assert len(adopted) == 1 and 0 < adopted[0]["generation"] < n
    assert [s for s in cap.segments() if s.flags & RST] == []
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before
