"""Quarantine on the standby: segments of the listed flows are recorded and dropped at tc ingress
before any socket exists for them, so the standby's kernel never answers them with a RST.

    with Quarantine("eth0", netns="lab-standby") as q:
        q.observe(flow)            # from now on the flow's segments are recorded and dropped
        ...take over the traffic, probe the peer...
        seen = q.observed(flow)    # the peer's latest seq, ack, window, TSval, TSecr
        q.release(flow)            # segments reach the (restored) socket again

Attached with no flow listed it lets everything through: a resurrector keeps one attached while
it watches, so a failover does not wait for the program to load (about 100 ms).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import TracebackType

import structlog

from kernel import bpfbuild
from kernel.bpf import layout
from kernel.bpf.layout import Flow, flow_key
from kernel.errors import KernelError
from kernel.libbpf import BPF_NOEXIST, BpfMap, BpfObject
from kernel.tcfilter import Direction, TcFilterError, TcHook, TcTarget

log = structlog.get_logger(component="tcpcp.kernel.quarantine")

QUARANTINE_PRIORITY = 0xAC01
PRIORITIES = 16
"""Quarantines that may share one interface (each at its own priority)."""


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


@functools.cache
def _empty_observation() -> bytes:  # computed once
    return layout.to_bytes(layout.new("struct quarantine_obs"))


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
            # several quarantines may share an interface (two resurrectors on one host): each
            # passes what is not its own to the next (TC_ACT_UNSPEC), so take the first free
            # priority from ours on
            for priority in range(self._priority, self._priority + PRIORITIES):
                try:
                    self._hook = TcHook(TcTarget(self.ifname, Direction.INGRESS, priority,
                                                 self.netns),
                                        self._obj.program_fd("quarantine_ingress"),
                                        "tcpcp_quarantine")
                    break
                except TcFilterError as exc:
                    if "File exists" not in str(exc) or \
                            priority == self._priority + PRIORITIES - 1:
                        raise
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()

    @property
    def priority(self) -> int | None:
        """The tc priority it is attached at (None: not attached)."""
        return None if self._hook is None else self._hook.target.priority

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
        self._map().update(flow_key(flow), _empty_observation(), BPF_NOEXIST)
        self.log.debug("quarantined", flow=str(flow))  # debug: thousands at once

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
        self.log.debug("released", flow=str(flow), packets=seen.packets if seen else 0)
        return seen
