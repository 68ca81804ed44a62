"""Keeping chosen flows silent on this host while they are passed: the two isolation mechanisms.

    GateIsolation("eth0")   the design's: each flow guarded at its rcv_nxt and frozen by the ACK
                            gate (egress dropped), its ingress dropped and recorded by the
                            quarantine (kernel/gate.py, kernel/quarantine.py)
    Isolation()             nftables sets matched at output and prerouting (no BPF needed)

Both take a batch of flows at once and are all-or-nothing: when one flow of a batch cannot be
isolated, the flows this call already isolated are released again before the error is raised.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import structlog

from kernel import repair
from kernel.errors import KernelError
from kernel.ici import Family, Identity

log = structlog.get_logger(component="tcpcp.kernel.isolation")


class IsolationError(KernelError):
    """Flows could not be isolated or released; nothing of the failed batch stays isolated."""


class FlowIsolation(Protocol):
    """Keeps chosen flows silent in both directions on this host while they are passed."""

    def add(self, flows: Sequence[Identity], socks: Sequence[socket.socket] = (), *,
            fail_after: int | None = None) -> None: ...

    def quarantine(self, flows: Sequence[Identity]) -> None:
        """Drop the flows' ingress only (a destination's restored sockets until activation)."""
        ...

    def remove(self, flows: Iterable[Identity], *, generation: int | None = None) -> None: ...

    def generation_of(self, flow: Identity) -> int | None: ...

    def close(self) -> None: ...


def _injected(fail_after: int | None, done: int) -> None:
    """Fault injection for tests: behave as a kernel refusal after `fail_after` flows."""
    if fail_after is not None and done >= fail_after:
        raise IsolationError(f"injected fault: isolation refused after {done} flows")


class Isolation:
    """Drops every packet of chosen flows in this network namespace, in both directions.

    nftables sets of (local addr, local port, peer addr, peer port), matched at output and at
    prerouting. Must be used from a process living in the namespace it guards: nft runs as a
    child, and the grace-period timer calls it from another thread.
    """

    def __init__(self, table: str = "tcpcp_isolate") -> None:
        self.table = table
        self.flows: dict[Identity, int] = {}  # flow -> generation of the add that isolated it
        self._generation = 0
        self._up = False
        self._lock = threading.Lock()

    def _nft(self, script: str) -> None:
        done = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True,
                              check=False)
        if done.returncode != 0:
            raise IsolationError(f"nft refused isolation rules: {done.stderr.strip()[:500]}")

    def _setup(self) -> None:
        t = self.table
        self._nft(f"""
table inet {t} {{
  set flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}
  set flows6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}
  chain out {{
    type filter hook output priority -300; policy accept;
    ip saddr . tcp sport . ip daddr . tcp dport @flows4 drop
    ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 drop
  }}
  chain in {{
    type filter hook prerouting priority -300; policy accept;
    ip daddr . tcp dport . ip saddr . tcp sport @flows4 drop
    ip6 daddr . tcp dport . ip6 saddr . tcp sport @flows6 drop
  }}
}}
""")
        self._up = True

    def _elements(self, op: str, flows: Iterable[Identity]) -> str:
        lines = []
        for f in flows:
            s = "flows4" if f.family is Family.IPV4 else "flows6"
            lines.append(f"{op} element inet {self.table} {s} {{ {f.local_ip} . {f.local_port}"
                         f" . {f.peer_ip} . {f.peer_port} }}")
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        """Create the table and its rules now, so that add() only inserts set elements."""
        with self._lock:
            if not self._up:
                self._setup()

    def add(self, flows: Sequence[Identity], socks: Sequence[socket.socket] = (), *,
            fail_after: int | None = None) -> None:
        """Drop the flows' packets from now on (one nft transaction: all or nothing)."""
        with self._lock:
            new = [f for f in flows if f not in self.flows]
            if not new:
                return
            _injected(fail_after, 0)
            if not self._up:
                self._setup()
            self._nft(self._elements("add", new))
            self._generation += 1
            self.flows.update(dict.fromkeys(new, self._generation))

    def quarantine(self, flows: Sequence[Identity]) -> None:
        """Both directions, here: a socket in repair mode has nothing to send anyway."""
        self.add(flows)

    def remove(self, flows: Iterable[Identity], *, generation: int | None = None) -> None:
        """Stop dropping these flows (with generation: only those isolated by that add)."""
        with self._lock:
            gone = [f for f in flows if f in self.flows
                    and (generation is None or self.flows[f] == generation)]
            if gone:
                self._nft(self._elements("delete", gone))
                for f in gone:
                    del self.flows[f]

    def generation_of(self, flow: Identity) -> int | None:
        return self.flows.get(flow)

    def close(self) -> None:
        with self._lock:
            if self._up:
                self._nft(f"delete table inet {self.table}\n")
                self._up = False
                self.flows.clear()

    def __enter__(self) -> Isolation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GateIsolation:
    """Isolation through the ACK gate (egress freeze) and the quarantine (ingress drop).

    Each flow is first guarded at its current rcv_nxt (read in repair mode: nothing the kernel
    has not acknowledged yet gets acknowledged), then frozen: every egress segment is dropped
    at tc egress. Its ingress segments are dropped (and recorded) at tc ingress. Both programs
    stay attached to `ifname` while this object is open.
    """

    def __init__(self, ifname: str = "eth0") -> None:
        from kernel.gate import AckGate
        from kernel.quarantine import Quarantine

        self._stack = contextlib.ExitStack()
        self.gate = self._stack.enter_context(AckGate(ifname))
        self.ingress = self._stack.enter_context(Quarantine(ifname))
        self.flows: dict[Identity, int] = {}
        self._gated: set[Identity] = set()  # flows guarded and frozen, not only quarantined
        self._generation = 0
        self._lock = threading.Lock()

    @staticmethod
    def _flow(f: Identity) -> Any:
        from kernel.bpf.layout import Flow

        return Flow(f.local_ip, f.local_port, f.peer_ip, f.peer_port)

    def _release(self, f: Identity) -> None:
        flow = self._flow(f)
        with contextlib.suppress(KernelError):
            self.ingress.release(flow)
        if f in self._gated:
            self._gated.discard(f)
            self.gate.forget(flow)

    def add(self, flows: Sequence[Identity], socks: Sequence[socket.socket] = (), *,
            fail_after: int | None = None) -> None:
        if len(socks) != len(flows):
            raise IsolationError(f"the gate isolates sockets: expected {len(flows)} sockets, "
                                 f"got {len(socks)}")
        with self._lock:
            self._generation += 1
            done: list[Identity] = []
            try:
                for f, sock in zip(flows, socks, strict=True):
                    if f in self.flows:
                        continue
                    _injected(fail_after, len(done))
                    rcv_nxt, wscale = repair.rcv_nxt_and_wscale(sock)
                    flow = self._flow(f)
                    done.append(f)  # from here a failure must release it
                    self._gated.add(f)
                    self.gate.guard(flow, rcv_nxt, wscale)
                    self.gate.freeze(flow)
                    self.ingress.observe(flow)
                    self.flows[f] = self._generation
            except BaseException as exc:
                for f in done:
                    self.flows.pop(f, None)
                    try:
                        self._release(f)
                    except Exception as undo_exc:  # keep rolling back the others
                        log.error("isolation_rollback_failed", conn=str(f), error=str(undo_exc))
                if isinstance(exc, KernelError | OSError):
                    raise IsolationError(f"isolating {len(flows)} flows failed after "
                                         f"{len(done)}, all released again: {exc}") from exc
                raise

    def quarantine(self, flows: Sequence[Identity]) -> None:
        with self._lock:
            self._generation += 1
            done: list[Identity] = []
            try:
                for f in flows:
                    if f in self.flows:
                        continue
                    done.append(f)
                    self.ingress.observe(self._flow(f))
                    self.flows[f] = self._generation
            except BaseException:
                for f in done:
                    self.flows.pop(f, None)
                    with contextlib.suppress(KernelError):
                        self._release(f)
                raise

    def remove(self, flows: Iterable[Identity], *, generation: int | None = None) -> None:
        with self._lock:
            for f in list(flows):
                if f in self.flows and (generation is None or self.flows[f] == generation):
                    del self.flows[f]
                    self._release(f)

    def generation_of(self, flow: Identity) -> int | None:
        return self.flows.get(flow)

    def close(self) -> None:
        with self._lock:
            self.flows.clear()
            self._stack.close()


def flow_of(sock: socket.socket) -> Identity:
    """The identity of a connected TCP socket."""
    local, peer = sock.getsockname(), sock.getpeername()
    family = Family.IPV6 if sock.family == socket.AF_INET6 else Family.IPV4
    return Identity(family, ipaddress.ip_address(local[0]).packed, local[1],
                    ipaddress.ip_address(peer[0]).packed, peer[1])
