"""The three crashes of a user's day, at once, under each peer stack variant.

One origin runs the HTTP file server and the key-value server, both guarded by its checkpointer.
Three unmodified clients drive them: `curl -T` uploads a file, `curl` downloads another (both
rate-limited, so each is mid-way at the crash), and `redis-cli` sends INCRs. The origin is
crashed from outside (the lab's crash); the standby's resurrector claims the origin, takes the
service address over, restores every connection from its checkpoint and hands each to its own
application (routed by port). Checked on the peer, for each variant: no RST, no PAWS drop, one
SYN per client (nobody reconnected), every byte once (checksums), the INCRs counted exactly
once. The variants are the peer's: timestamps off, SACK off, window scaling off, ECN on, IPv6.
With ECN the resurrector runs with --ecn downgrade: a stock kernel cannot restore ECN, and its
default refuses such a connection (the peer would then see a RST from the standby).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops import gatelab as G
from ops.agentlab import AgentProcess, write_keys
from ops.capture import Capture
from ops.failoverlab import ResurrectorProcess, events
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from store.client import CheckpointStore
from store.config import StoreConfig
from store.signing import load_keyring

RST, SYN, ACK = 0x04, 0x02, 0x10
FILES, KV = 5531, 5532
SIZE = 8_000_000
DOWNLOAD = 24_000_000  # curl's --limit-rate lets a download run ahead of it at first
INCRS = 300
ECT = (1, 2)  # ECT(1), ECT(0)

VARIANTS = {
    "defaults": (4, {}),
    "no_timestamps": (4, {"net.ipv4.tcp_timestamps": 0}),
    "no_sack": (4, {"net.ipv4.tcp_sack": 0}),
    "no_window_scaling": (4, {"net.ipv4.tcp_window_scaling": 0}),
    "ecn": (4, {"net.ipv4.tcp_ecn": 1}),
    "ipv6": (6, {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_upload_a_download_and_an_incr_session_survive_one_crash(
        fresh_lab: Lab, tmp_path: Path, variant: str) -> None:
    lab = fresh_lab
    family, sysctls = VARIANTS[variant]
    # a receive buffer of 512 KiB at most: --limit-rate paces the download on the wire, not
    # only into a peer buffer that would swallow megabytes at once
    lab.sysctl("peer", "net.ipv4.tcp_rmem", "4096 131072 524288")
    for key, value in sysctls.items():
        lab.sysctl("peer", key, value)
    redis = RedisServer(lab, "store", 6441).start()
    keys = write_keys(tmp_path / "keys.json")
    origin = f"mx-{variant.replace('_', '-')}"
    root = tmp_path / "root"
    root.mkdir()
    download = os.urandom(DOWNLOAD)
    (root / "down.bin").write_bytes(download)
    upload = os.urandom(SIZE)
    (tmp_path / "up.bin").write_bytes(upload)
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[FILES, KV],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    sockets = agent.socket_path.parent
    env = dict(os.environ, TCPCP_LOG_FORMAT="json")
    any_addr = "[::]" if family == 6 else "0.0.0.0"
    service = lab.service(family)
    url_host = f"[{service}]" if family == 6 else service
    cap = None
    store = lab.call("peer", CheckpointStore.connect, StoreConfig(url=redis.url),
                     load_keyring(keys))
    logs = {name: tmp_path / f"{name}.log" for name in (
        "resurrector", "files", "kv", "standby-files", "standby-kv")}
    try:
        lab.move_address("origin")  # the resurrector takes the address over (and announces it)
        agent.start()
        ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                           log=logs["resurrector"], extra=[
                               "--handover-socket", f"{FILES}={sockets / 'files.sock'}",
                               "--handover-socket", f"{KV}={sockets / 'kv.sock'}",
                               *(["--ecn", "downgrade"] if variant == "ecn" else [])]).start()
        for app, name, extra in (("fileserver", "standby-files", ["--root", str(root)]),
                                 ("kvserver", "standby-kv", [])):
            sock = sockets / ("files.sock" if app == "fileserver" else "kv.sock")
            with logs[name].open("wb") as out:
                lab.popen("standby", [sys.executable, "-m", f"ops.apps.{app}", "--adopt",
                                      str(sock), *extra], stdout=out,
                          stderr=subprocess.STDOUT, env=env)
        for app, name, port, extra in (("fileserver", "files", FILES, ["--root", str(root)]),
                                       ("kvserver", "kv", KV, [])):
            with logs[name].open("wb") as out:
                lab.popen("origin", [sys.executable, "-m", f"ops.apps.{app}", "--listen",
                                     f"{any_addr}:{port}", "--checkpointer",
                                     str(agent.socket_path), *extra],
                          stdout=out, stderr=subprocess.STDOUT, env=env)
            wait_until(lambda n=name: events(logs[n], "listening"),  # type: ignore[misc]
                       30, what=f"the origin's {name} server listening")
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {FILES} or tcp port {KV}",
                             snaplen=96, path=tmp_path / "peer.pcap").start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        got = tmp_path / "got.bin"
        clients = {
            "upload": lab.popen("peer", [
                "curl", "-sS", "--fail", "--limit-rate", "1500K", "-T", str(tmp_path / "up.bin"),
                f"http://{url_host}:{FILES}/up.bin"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            "download": lab.popen("peer", [
                "curl", "-sS", "--fail", "--limit-rate", "1500K", "-o", str(got),
                f"http://{url_host}:{FILES}/down.bin"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            "incr": lab.popen("peer", [
                "redis-cli", "-h", service, "-p", str(KV), "-r", str(INCRS), "-i", "0.01",
                "INCR", "counter"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        }

        def under_way() -> bool:
            cps = [r.checkpoint for r in lab.call("peer", lambda: list(store.records(origin)))
                   if r.checkpoint is not None]
            files = [cp for cp in cps if f":{FILES}>" in cp.conn]
            uploads = [cp for cp in files if cp.inbound_consumed > 1_000_000]
            downloads = [cp for cp in files if cp.outbound_produced > 2_000_000]
            incrs = [cp for cp in cps if f":{KV}>" in cp.conn and cp.outbound_produced > 100]
            return bool(uploads and downloads and incrs)
        wait_until(under_way, 60, what="all three clients under way, committed on the origin")
        lab.crash("origin")
        crashed_at = time.time()  # the capture's clock: this machine's, no guest involved
        results = {name: p.communicate(timeout=120) for name, p in clients.items()}
    finally:
        if cap is not None:
            cap.stop()
        lab.call("peer", store.close)
        agent.close()
    for name, p in clients.items():
        assert p.returncode == 0, (name, results[name][1],
                                   logs["resurrector"].read_text()[-2000:])
    timeline = events(logs["resurrector"], "failover_timeline")
    assert len(timeline) == 1 and timeline[0]["resurrected"] == 3, timeline
    assert "stored /up.bin" in results["upload"][0]
    assert hashlib.sha256((root / "up.bin").read_bytes()).digest() == \
        hashlib.sha256(upload).digest()
    assert events(logs["standby-files"], "upload_resumed"), "the upload ended before the crash"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(download).digest()
    assert events(logs["standby-files"], "response_resumed"), "the download ended before"
    assert results["incr"][0].split() == [str(i) for i in range(1, INCRS + 1)]
    segments = cap.segments()
    assert [s for s in segments if s.flags & RST] == []
    syns = [s for s in segments if s.flags & SYN and not s.flags & ACK]
    assert len(syns) == 3, f"expected one SYN per client (no reconnect), got {len(syns)}"
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before
    if variant == "ecn":
        # negotiated: the origin's data went out ECN-capable. A stock kernel cannot give a
        # repaired socket its ECN state back (kernel/sanity.py), so with --ecn downgrade the
        # standby's data goes out not ECN-capable: measured here, so a kernel that starts
        # restoring ECN (kernel/patches/0005) shows up as this assertion failing
        served = [s for s in segments if s.payload_len and s.sport == FILES]
        before = [s for s in served if s.at < crashed_at]
        after = [s for s in served if s.at > crashed_at + 0.5]
        assert before and all(s.ecn in ECT for s in before)
        assert after and all(s.ecn not in ECT for s in after)
        assert len(events(logs["resurrector"], "ecn_downgraded")) == 3
