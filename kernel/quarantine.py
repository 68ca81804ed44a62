"""Quarantine on the standby: segments of the listed flows are recorded and dropped at tc ingress
before any socket exists for them, so the standby's kernel never answers them with a RST.

    with Quarantine("eth0", netns="lab-standby") as q:
        q.observe(flow)            # from now on the flow's segments are recorded and dropped
        ...take over the traffic, probe the peer...
        seen = q.observed(flow)    # the peer's latest seq, ack, window, TSval, TSecr
        q.release(flow)            # segments reach the (restored) socket again
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import structlog

from kernel import bpfbuild
from kernel.bpf import layout
from kernel.bpf.layout import Flow, flow_key
from kernel.errors import KernelError
from kernel.libbpf import BPF_NOEXIST, BpfMap, BpfObject
from kernel.tcfilter import Direction, TcHook, TcTarget

log = structlog.get_logger(component="tcpcp.kernel.quarantine")

QUARANTINE_PRIORITY = 0xAC01


class QuarantineError(KernelError):
    """The quarantine was used outside its context or for a flow it does not hold."""


@dataclass(frozen=True, slots=True)
class Observation:
    """The peer's latest segment of a quarantined flow (host byte order; window unscaled)."""

    seq: int
    end_seq: int
    ack: int
    window: int
    tsval: int | None
    tsecr: int | None
    tcp_flags: int
    packets: int


class Quarantine:
    """The ingress quarantine on one interface, attached while the context is open."""

    def __init__(self, ifname: str, netns: str | None = None,
                 priority: int = QUARANTINE_PRIORITY) -> None:
        self.ifname = ifname
        self.netns = netns
        self._priority = priority
        self._obj: BpfObject | None = None
        self._hook: TcHook | None = None
        self.log = log.bind(ifname=ifname, netns=netns)

    def __enter__(self) -> Quarantine:
        try:
            self._obj = BpfObject(bpfbuild.object_bytes("quarantine"), "quarantine")
            self._flows = self._obj.map("quarantine_flows")
            self._hook = TcHook(TcTarget(self.ifname, Direction.INGRESS, self._priority,
                                         self.netns),
                                self._obj.program_fd("quarantine_ingress"), "tcpcp_quarantine")
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove the program; every quarantined flow is released."""
        if self._hook is not None:
            self._hook.detach()
            self._hook = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def _map(self) -> BpfMap:
        if self._obj is None:
            raise QuarantineError("expected an open Quarantine (use it as a context manager), "
                                  "got a closed one")
        return self._flows

    def observe(self, flow: Flow) -> None:
        """Record and drop every segment of flow arriving from now on."""
        empty = layout.to_bytes(layout.new("struct quarantine_obs"))
        self._map().update(flow_key(flow), empty, BPF_NOEXIST)
        self.log.info("quarantined", flow=str(flow))

    def observed(self, flow: Flow) -> Observation | None:
        """The peer's latest segment of flow; None when none arrived yet."""
        raw = self._map().lookup(flow_key(flow))
        if raw is None:
            raise QuarantineError(f"expected flow {flow} in quarantine, found none")
        o = layout.from_bytes("struct quarantine_obs", raw)
        if o.packets == 0:
            return None
        return Observation(o.seq, o.end_seq, o.ack, o.window,
                           o.tsval if o.has_ts else None, o.tsecr if o.has_ts else None,
                           o.tcp_flags, o.packets)

    def release(self, flow: Flow) -> Observation | None:
        """Stop quarantining flow; returns its last observation."""
        seen = self.observed(flow)
        self._map().delete(flow_key(flow))
        self.log.info("released", flow=str(flow), packets=seen.packets if seen else 0)
        return seen
