"""Attach a loaded BPF program to an interface at tc ingress or egress (clsact qdisc, cls_bpf in
direct-action mode, by fd) and detach it again, with pyroute2 netlink (never the `tc` command).

`TcHook` is a context manager: the filter is removed on exit, and so is the clsact qdisc when this
hook created it (or took over the filter a killed process left there) and no other filter is left
on it. `replace=True` swaps the program of a filter already at the same place and priority in one
netlink request, so no packet passes unfiltered between the old program and the new one.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kernel.errors import KernelError

log = structlog.get_logger(component="tcpcp.kernel.tcfilter")

_TC_H_CLSACT = 0xFFFFFFF1
_ETH_P_ALL = 0x0003


class Direction(enum.Enum):
    """Which side of the interface the program sees; the value is the clsact parent handle."""

    INGRESS = 0xFFFFFFF2
    EGRESS = 0xFFFFFFF3


class TcFilterError(KernelError):
    """A tc netlink request failed."""


@dataclass(frozen=True, slots=True)
class TcTarget:
    """Where a program goes: interface, direction, filter priority, namespace (None: ours)."""

    ifname: str
    direction: Direction
    priority: int
    netns: str | None = None


def _ipr(netns: str | None) -> IPRoute:
    return IPRoute(netns=netns) if netns else IPRoute()


def _index(ipr: IPRoute, target: TcTarget) -> int:
    found = ipr.link_lookup(ifname=target.ifname)
    if not found:
        raise TcFilterError(f"expected interface {target.ifname} in netns "
                            f"{target.netns or '(current)'}, found none")
    return int(found[0])


def _filters(ipr: IPRoute, index: int, parent: int) -> list[Any]:
    return list(ipr.get_filters(index=index, parent=parent))


class TcHook:
    """A BPF program attached at one interface and direction while the hook is open."""

    def __init__(self, target: TcTarget, prog_fd: int, name: str, replace: bool = False) -> None:
        self.target = target
        self.name = name
        self._created_qdisc = False
        self._attached = False
        self.took_over = False  # replace=True found a filter of the same name there
        with _ipr(target.netns) as ipr:
            index = _index(ipr, target)
            try:
                ipr.tc("add", "clsact", index)
                self._created_qdisc = True
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: someone's clsact is already there, share it
                    raise TcFilterError(f"expected to add clsact on {target.ifname}, got {exc}"
                                        ) from exc
            if replace:
                self.took_over = self._has_filter_named(ipr, index)
                self._created_qdisc = self._created_qdisc or self.took_over
            try:
                ipr.tc("replace-filter" if replace else "add-filter", "bpf", index, ":1",
                       fd=prog_fd, name=name,
                       parent=target.direction.value, prio=target.priority,
                       protocol=_ETH_P_ALL, classid=1, direct_action=True)
            except NetlinkError as exc:
                self._remove_qdisc_if_ours(ipr, index)
                raise TcFilterError(
                    f"expected to attach {name} at {target.direction.name.lower()} of "
                    f"{target.ifname} prio {target.priority}, got {exc}") from exc
        self._attached = True
        log.info("tc_attached", program=name, ifname=target.ifname, netns=target.netns,
                 direction=target.direction.name.lower(), prio=target.priority)

    def _has_filter_named(self, ipr: IPRoute, index: int) -> bool:
        for f in _filters(ipr, index, self.target.direction.value):
            opts = f.get_attr("TCA_OPTIONS")
            bpf_name = opts.get_attr("TCA_BPF_NAME") if opts else None
            if f["info"] >> 16 == self.target.priority and bpf_name and self.name in bpf_name:
                return True
        return False

    def _remove_qdisc_if_ours(self, ipr: IPRoute, index: int) -> None:
        if not self._created_qdisc:
            return
        if any(_filters(ipr, index, d.value) for d in Direction):
            return
        with contextlib.suppress(NetlinkError):
            ipr.tc("del", "clsact", index)

    def detach(self) -> None:
        """Remove the filter (and our clsact qdisc if nothing else uses it). Idempotent."""
        if not self._attached:
            return
        self._attached = False
        t = self.target
        try:
            with _ipr(t.netns) as ipr:
                index = _index(ipr, t)
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del-filter", "bpf", index, ":1", parent=t.direction.value,
                           prio=t.priority, protocol=_ETH_P_ALL)
                self._remove_qdisc_if_ours(ipr, index)
        except (TcFilterError, OSError) as exc:  # namespace or interface already gone
            log.info("tc_detach_skipped", program=self.name, reason=str(exc))
            return
        log.info("tc_detached", program=self.name, ifname=t.ifname, netns=t.netns)

    def __enter__(self) -> TcHook:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()
