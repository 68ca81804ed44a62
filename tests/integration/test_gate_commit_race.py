"""Commits of one flow made from two threads at once: the ACKs they send never carry an ack below
one already sent (DESIGN.md section 4), checked on a capture taken on the gateway, with each gate
backend the kernel has (the eBPF gate's forced ACKs; the patched kernel's own)."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import socket
import threading
from pathlib import Path

from kernel.gatebackend import Gate, open_gate
from kernel.seq import seq_diff
from ops import gatelab as G
from ops.lab import Lab

PORT = 5700
SENT = 12_000  # under the initial congestion window: all sent while nothing is committed
STEPS = 3000


def _commit_every_other(gate: Gate, conn: socket.socket, base: int, first: int,
                        start: threading.Barrier) -> None:
    # both threads on one CPU: their ACKs leave tc egress in the order they were sent, so what
    # the capture shows is the order the gate sent them in, not CPUs racing to the wire
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start.wait()
    for i in range(first, STEPS, 2):
        gate.commit(conn, base + (i + 1) * SENT // STEPS)


def test_acks_of_concurrent_commits_never_go_back(lab: Lab, tmp_path: Path,
                                                 gate_backend: str) -> None:
    pcap = tmp_path / "race.pcap"
    with open_gate("eth0", backend=gate_backend, netns=lab.netns("origin")) as gate, \
            G.guarded_connection(lab, gate, PORT) as (conn, peer, base):
        assert base is not None
        peer.sendall(b"r" * SENT)
        got = 0
        while got < SENT:
            chunk = conn.recv(SENT - got)
            assert chunk
            got += len(chunk)
        with G.gateway_capture(lab, f"tcp src port {PORT}", path=pcap) as cap:
            start = threading.Barrier(2, timeout=30)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                done = [pool.submit(_commit_every_other, gate, conn, base, first, start)
                        for first in (0, 1)]
                for fut in done:
                    fut.result(timeout=60)  # a committing thread's error fails the test
        conn.close()
        peer.close()
    acks = [s.ack for s in cap.segments() if s.flags == 0x10 and s.payload_len == 0]
    assert len(acks) >= STEPS // 2
    assert acks[-1] == (base + SENT) & 0xFFFFFFFF
    back = [(a, b) for a, b in itertools.pairwise(acks) if seq_diff(b, a) < 0]
    assert back == []
