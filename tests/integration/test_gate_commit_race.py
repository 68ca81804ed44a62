"""Commits of one flow made from two threads at once: the forced ACKs they send never carry an ack
below one already sent (DESIGN.md section 4), checked on a capture taken on the gateway."""

from __future__ import annotations

import itertools
import os
import socket
import threading
from pathlib import Path

from kernel.bpf.layout import Flow
from kernel.gate import AckGate
from kernel.seq import seq_diff
from ops import gatelab as G
from ops import netns
from ops.lab import Lab

PORT = 5700
SENT = 12_000  # under the initial congestion window: all sent while nothing is committed
STEPS = 3000


def _connect(service: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((service, PORT))
    return s


def _commit_every_other(gate: AckGate, flow: Flow, base: int, first: int,
                        start: threading.Barrier) -> None:
    # both threads on one CPU: their ACKs leave tc egress in the order they were sent, so what
    # the capture shows is the order the gate sent them in, not CPUs racing to the wire
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start.wait()
    for i in range(first, STEPS, 2):
        gate.commit(flow, base + (i + 1) * SENT // STEPS)


def test_forced_acks_of_concurrent_commits_never_go_back(lab: Lab, tmp_path: Path) -> None:
    pcap = tmp_path / "race.pcap"
    with AckGate("eth0", netns=lab.netns("origin")) as gate:
        gate.guard_listen(PORT)
        srv = lab.call("origin", G.listener, 4, PORT)
        try:
            accept = lab.submit("origin", srv.accept)
            peer = lab.call("peer", _connect, lab.service(4))
            conn, addr = accept.result(timeout=10)
            conn.settimeout(10)
            flow = Flow.of(conn.getsockname()[:2], addr[:2])
            cfg = gate.config(flow)
            assert cfg is not None
            peer.sendall(b"r" * SENT)
            got = 0
            while got < SENT:
                chunk = conn.recv(SENT - got)
                assert chunk
                got += len(chunk)
            cap = G.start_capture(netns.command(lab.netns("gw"), []), "p-origin", pcap,
                                  f"tcp src port {PORT}")
            try:
                start = threading.Barrier(2)
                threads = [threading.Thread(target=_commit_every_other,
                                            args=(gate, flow, cfg.committed_seq, first, start))
                           for first in (0, 1)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=60)
            finally:
                G.stop_capture(cap)
            conn.close()
            peer.close()
        finally:
            srv.close()
    acks = [s.ack for s in G.read_pcap(pcap) if s.flags == 0x10 and s.payload_len == 0]
    assert len(acks) >= STEPS // 2
    assert acks[-1] == (cfg.committed_seq + SENT) & 0xFFFFFFFF
    back = [(a, b) for a, b in itertools.pairwise(acks) if seq_diff(b, a) < 0]
    assert back == []
