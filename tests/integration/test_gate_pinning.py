"""A gate with pinned maps survives the death of its process (lab): after SIGKILL the filter stays
attached and the flows stay held at their last commit; a restarted gate takes over the pinned
state and the filters, commits from where the dead one stopped, and a clean exit leaves nothing
behind (no pins, no filters)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from kernel.bpf.layout import Flow
from kernel.repair import tcp_info
from kernel.tcfilter import Direction
from ops import gatelab as G
from ops.lab import Lab
from ops.wait import wait_until

PORT = 5800
REPO = Path(__file__).resolve().parents[2]

# A stand-in checkpointer: holds an AckGate with pinned maps and obeys one command per line.
CHECKPOINTER = r"""
import json, sys
from pathlib import Path
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from kernel.bpf.layout import Flow
from kernel.gate import AckGate
netns, pin_root, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
gate = AckGate("eth0", netns=netns, pin_root=pin_root).__enter__()
if port:
    gate.guard_listen(port)
print(json.dumps({"reattached": gate.reattached, "pin_dir": str(gate.pin_dir)}), flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "exit":
        gate.detach()
        print("bye", flush=True)
        break
    flow = Flow.of((args[0], int(args[1])), (args[2], int(args[3])))
    if cmd == "config":
        cfg = gate.config(flow)
        print(json.dumps(None if cfg is None else cfg.committed_seq), flush=True)
    elif cmd == "commit":
        print(json.dumps(gate.commit(flow, int(args[4]))), flush=True)
"""


class Checkpointer:
    """The stand-in checkpointer process."""

    def __init__(self, lab: Lab, pin_root: Path, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINTER, lab.netns("origin"), str(pin_root), str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        self.hello = json.loads(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"checkpointer exited with {self.proc.wait(5)}"
        return line

    def ask(self, *words: object) -> object:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def config(self, flow: Flow) -> object:
        return self.ask("config", *_words(flow))

    def commit(self, flow: Flow, seq: int) -> object:
        return self.ask("commit", *_words(flow), seq & 0xFFFFFFFF)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        assert self._line().strip() == "bye"
        assert self.proc.wait(10) == 0


def _words(flow: Flow) -> tuple[object, ...]:
    return (flow.local_addr, flow.local_port, flow.remote_addr, flow.remote_port)


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A private bpffs instance (the host's /sys/fs/bpf is left alone)."""
    mnt = tmp_path / "bpffs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _gate_filters(lab: Lab) -> list[str]:
    with IPRoute(netns=lab.netns("origin")) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        names = []
        for d in Direction:
            try:
                filters = list(ipr.get_filters(index=idx, parent=d.value))
            except Exception:  # no clsact qdisc
                continue
            for f in filters:
                opts = f.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts else None
                if name:
                    names.append(f"{d.name}:{name}")
        return sorted(names)




def _connect(service: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((service, PORT))
    return s


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "connection ended"
        data += chunk
    return data


def _wait_acked(peer: socket.socket, want: int, timeout: float = 10.0) -> None:
    """Until the peer's bytes_acked (counting the SYN) is want."""
    wait_until(lambda: tcp_info(peer).tcpi_bytes_acked == want, timeout,
               what=f"the peer's bytes_acked at {want}")


def test_restarted_gate_takes_over_the_flows_a_killed_one_held_at_their_last_commit(
        lab: Lab, bpffs: Path) -> None:
    first = Checkpointer(lab, bpffs, PORT)
    second: Checkpointer | None = None
    srv = lab.call("origin", G.listener, 4, PORT)
    socks: list[socket.socket] = [srv]
    try:
        assert first.hello["reattached"] is False  # type: ignore[index]
        pin_dir = Path(first.hello["pin_dir"])  # type: ignore[index]
        accept = lab.submit("origin", srv.accept)
        peer = lab.call("peer", _connect, lab.service(4))
        conn, addr = accept.result(timeout=10)
        conn.settimeout(10)
        socks += [peer, conn]
        flow = Flow.of(conn.getsockname()[:2], addr[:2])
        base = first.config(flow)
        assert isinstance(base, int)
        peer.sendall(b"a" * 6000)
        assert _read(conn, 6000) == b"a" * 6000
        assert first.commit(flow, base + 2000) is True
        _wait_acked(peer, 1 + 2000)  # bytes_acked counts the SYN
        retransmitted = tcp_info(peer).tcpi_total_retrans

        first.kill()
        assert _gate_filters(lab) == ["EGRESS:tcpcp_gate", "INGRESS:tcpcp_gate_syn"]
        assert sorted(p.name for p in pin_dir.iterdir()) == sorted(
            ["gate_flows", "gate_settings", "gate_states", "guarded_ports"])
        # the peer retransmits its held bytes; the origin's answer must stay clamped
        wait_until(lambda: tcp_info(peer).tcpi_total_retrans > retransmitted, 10,
                   what="the peer retransmitting its held bytes")
        G.observe_for(0.2)  # the answer (RTT well under 1 ms) has come if it was to come
        assert tcp_info(peer).tcpi_bytes_acked == 1 + 2000  # nobody commits: held there

        second = Checkpointer(lab, bpffs, 0)
        assert second.hello == {"reattached": True, "pin_dir": str(pin_dir)}
        assert second.config(flow) == (base + 2000) & 0xFFFFFFFF
        assert _gate_filters(lab) == ["EGRESS:tcpcp_gate", "INGRESS:tcpcp_gate_syn"]
        assert second.commit(flow, base + 6000) is True  # a forced ACK from the taken-over state
        _wait_acked(peer, 1 + 6000)
        sending = lab.submit("peer", peer.sendall, b"b" * 30_000)
        got = 0
        while got < 30_000:  # commits keep pace with the data
            chunk = conn.recv(65536)
            assert chunk and chunk == b"b" * len(chunk)
            got += len(chunk)
            second.commit(flow, base + 6000 + got)
        sending.result(timeout=10)
        conn.sendall(b"d" * 1000)
        assert _read(peer, 1000) == b"d" * 1000
        _wait_acked(peer, 1 + 36_000)

        # the guarded port survived too: a new connection is gated from its SYN-ACK
        accept = lab.submit("origin", srv.accept)
        peer2 = lab.call("peer", _connect, lab.service(4))
        conn2, addr2 = accept.result(timeout=10)
        socks += [peer2, conn2]
        assert isinstance(second.config(Flow.of(conn2.getsockname()[:2], addr2[:2])), int)

        second.exit()
        assert _gate_filters(lab) == []
        assert not pin_dir.exists()
        with IPRoute(netns=lab.netns("origin")) as ipr:  # the clsact qdisc went with them
            qdiscs = ipr.get_qdiscs(ipr.link_lookup(ifname="eth0")[0])
            assert [q.get_attr("TCA_KIND") for q in qdiscs].count("clsact") == 0
    finally:
        for s in socks:
            s.close()
        for c in (first, second):
            if c is not None and c.proc.poll() is None:
                c.kill()
        if _gate_filters(lab):  # a failed run must not leave the gate on the lab's origin
            with IPRoute(netns=lab.netns("origin")) as ipr:
                ipr.tc("del", "clsact", ipr.link_lookup(ifname="eth0")[0])
