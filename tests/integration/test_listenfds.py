"""resurrector --exec's hand-over: connections started with as inherited descriptors (the
LISTEN_FDS convention, resurrector/listenfds.py) and read back with resurrector.adopt.inherited:
on real TCP sockets of this machine, then through a crash in the lab."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ops import gatelab as G
from ops.agentlab import AgentProcess, write_keys
from ops.capture import Capture
from ops.failoverlab import ResurrectorProcess, events
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from resurrector.adopt import inherited
from resurrector.handover import Handed, HandoverError
from resurrector.listenfds import spawn
from store.client import CheckpointStore
from store.config import StoreConfig
from store.signing import load_keyring

CHILD = r"""
import json, sys
from resurrector.adopt import inherited
conns = inherited()
out = []
for c in conns:
    c.sock.sendall(c.state)               # proves the descriptor is the connection
    out.append([c.conn, c.consumed, c.produced, c.skip, c.contract, c.state.decode()])
print(json.dumps({"adopted": out, "env": sorted(k for k in __import__("os").environ
                                                if k.startswith(("LISTEN_", "TCPCP_HANDOVER")))}))
"""


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname())
        server, _ = lst.accept()
    return client, server


def test_connections_arrive_in_order_with_their_positions_and_states() -> None:
    pairs = [_pair() for _ in range(3)]
    handed = [Handed(f"c{i}", "web1", 7, 100 * i, 200 * i, i, "regenerable" if i % 2 else
                     "logged", f"state-{i}".encode()) for i in range(3)]
    try:
        child = spawn([sys.executable, "-c", CHILD],
                      [(h, server) for h, (_, server) in zip(handed, pairs, strict=True)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      env=dict(os.environ, PYTHONPATH=os.getcwd()))
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        doc = json.loads(out)
        assert doc["adopted"] == [[h.conn, h.consumed, h.produced, h.skip, h.contract,
                                   h.state.decode()] for h in handed]
        assert doc["env"] == []  # consumed, as sd_listen_fds(1) does
        for h, (client, _) in zip(handed, pairs, strict=True):
            client.settimeout(10)
            assert client.recv(100) == h.state
    finally:
        for client, server in pairs:
            client.close()
            server.close()


def test_variables_meant_for_another_process_are_refused() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "TCPCP_HANDOVER_FD": "4"}
    with pytest.raises(HandoverError, match="expected LISTEN_PID"):
        inherited(env)
    assert env == {}
    assert inherited({}) == []
    with pytest.raises(HandoverError, match="as integers"):
        inherited({"LISTEN_FDS": "x", "LISTEN_PID": "1", "TCPCP_HANDOVER_FD": "4"})
    with pytest.raises(HandoverError, match="3 \\+ LISTEN_FDS"):
        inherited({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()),
                   "TCPCP_HANDOVER_FD": "9"})


def test_a_resurrector_starting_the_application_hands_it_the_crashed_upload(
        fresh_lab: Lab, tmp_path: Path) -> None:
    """resurrector --exec: after the crash it starts the standby's sink with the resurrected
    upload inherited (no hand-over socket, no application waiting beforehand); the peer's
    upload completes, every byte once, no RST."""
    lab = fresh_lab
    redis = RedisServer(lab, "store", 6451).start()
    keys = write_keys(tmp_path / "keys.json")
    origin, port, total = "exec", 5541, 8_000_000
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[port],
                         workdir=tmp_path, origin=origin, ttl_ms=1000, backend="bpf")
    resurrector_log = tmp_path / "resurrector.log"
    cap = None
    store = lab.call("peer", CheckpointStore.connect, StoreConfig(url=redis.url),
                     load_keyring(keys))
    try:
        lab.move_address("origin")
        agent.start()
        ResurrectorProcess(lab, "standby", store_url=redis.url, keys=keys, origin=origin,
                           log=resurrector_log, serve=[lab.service(4)], extra=[
                               "--exec", f"{sys.executable} -m ops.apps.sink "
                               "--adopt-inherited"]).start()
        sink_log = tmp_path / "sink.log"
        with sink_log.open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.sink", "--listen",
                                 f"0.0.0.0:{port}", "--checkpointer", str(agent.socket_path),
                                 "--think-ms", "5"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: b"listening" in sink_log.read_bytes(), 30, what="the sink")
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {port}", snaplen=80,
                             path=tmp_path / "peer.pcap").start()
        uploader = lab.popen("peer", G.uploader_argv(lab.service(4), port, total),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: any(r.checkpoint.inbound_consumed > 1_000_000 for r in lab.call(
            "peer", lambda: list(store.records(origin))) if r.checkpoint), 60,
            what="1 MB committed on the origin")
        lab.crash("origin")
        out_text, err = uploader.communicate(timeout=120)
        wait_until(lambda: events(resurrector_log, "finished"), 30,
                   what="the started sink finishing the upload")
    finally:
        if cap is not None:
            cap.stop()
        lab.call("peer", store.close)
        agent.close()
    assert uploader.returncode == 0, err
    assert out_text.strip() == G.expected_sha256(total)
    (started,) = events(resurrector_log, "application_started")
    assert started["connections"] == 1
    (finished,) = events(resurrector_log, "finished")
    assert finished["total"] == total and 0 < finished["consumed"] < total
    assert [s for s in cap.segments() if s.flags & 0x04] == []
