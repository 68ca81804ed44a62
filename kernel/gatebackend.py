"""One ACK-gate interface for callers, whichever backend implements it on this host.

    with open_gate("eth0", netns="lab-origin") as gate:    # backend None: patch if the kernel
        gate.backend                                        # has TCP_COMMIT_SEQ, else bpf
        gate.guard_listen(listener)       # connections it accepts are gated from their SYN-ACK
        gate.guard(sock)                  # or gate a live socket at what it has received
        gate.committed_seq(sock)          # the committed (acknowledged at most) sequence
        gate.commit(sock, seq)            # -> True when the ACK moved; an ACK leaves at once

Both backends are keyed by the socket here: the `bpf` one (kernel/gate.py, a tc program on
ifname inside netns) derives the flow's 4-tuple, rcv_nxt and receive window scale from it; the
`patch` one (kernel/patch_gate.py) sets the socket option and ignores ifname and netns. The
backend-specific gate stays reachable (`bpf_gate`, `patch_gate`) for what only one of them
does (freeze/thaw and counters are the eBPF gate's).
"""

from __future__ import annotations

import socket
import weakref
from pathlib import Path
from types import TracebackType

import structlog

from kernel import repair
from kernel.bpf.layout import Flow
from kernel.errors import KernelError
from kernel.gate import AckGate
from kernel.patch_gate import Backend, PatchGate, commit_option_present, select_backend

log = structlog.get_logger(component="tcpcp.kernel.gatebackend")


def socket_flow(sock: socket.socket) -> Flow:
    """The connection's 4-tuple as the eBPF gate keys it."""
    return Flow.of(sock.getsockname()[:2], sock.getpeername()[:2])


class Gate:
    """The ACK gate with the verbs both backends share; open it as a context manager."""

    def __init__(self, backend: Backend, ifname: str, netns: str | None,
                 pin_root: Path | None = None) -> None:
        self.backend = backend
        self.pin_root = pin_root
        self.ifname = ifname
        self.netns = netns
        self._bpf: AckGate | None = None
        self._patch: PatchGate | None = None
        # the bpf gate keys flows by 4-tuple: remembered per socket, so that a socket whose
        # connection has ended (TIME_WAIT: no peer name any more) can still commit its FIN
        self._flows: weakref.WeakKeyDictionary[socket.socket, Flow] = \
            weakref.WeakKeyDictionary()

    def open(self) -> Gate:
        """Attach the eBPF gate / check the patched kernel; a second call changes nothing."""
        if self._bpf is None and self._patch is None:
            if self.backend is Backend.PATCH:
                self._patch = PatchGate()
            else:
                self._bpf = AckGate(self.ifname, netns=self.netns,
                                    pin_root=self.pin_root).__enter__()
            log.info("gate_opened", backend=self.backend.value, ifname=self.ifname,
                     netns=self.netns)
        return self

    def __enter__(self) -> Gate:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Detach the eBPF gate (its flows become ungated); patched sockets stay gated."""
        if self._bpf is not None:
            self._bpf.detach()
            self._bpf = None
        self._patch = None

    def leave(self) -> None:
        """Stop using the gate without ungating anything: the eBPF gate stays attached with its
        maps pinned (needs pin_root) for the next process to take over; patched sockets stay
        gated by the kernel."""
        if self._bpf is not None:
            self._bpf.leave()
            self._bpf = None
        self._patch = None

    @property
    def reattached(self) -> bool:
        """The eBPF gate took over the pinned state a previous process left."""
        return self._bpf is not None and self._bpf.reattached

    @property
    def bpf_gate(self) -> AckGate:
        if self._bpf is None:
            raise _closed_or_other(self.backend, Backend.BPF)
        return self._bpf

    @property
    def patch_gate(self) -> PatchGate:
        if self._patch is None:
            raise _closed_or_other(self.backend, Backend.PATCH)
        return self._patch

    def guard_listen(self, listener: socket.socket) -> None:
        """Every connection listener accepts from now on is gated from its SYN-ACK (call it
        before connections arrive); committed_seq of an accepted socket is its start."""
        if self.backend is Backend.PATCH:
            self.patch_gate.guard_listen(listener)
        else:
            self.bpf_gate.guard_listen(listener.getsockname()[1])

    def guard(self, sock: socket.socket, committed_seq: int | None = None) -> int:
        """Gate a connected socket from now on, committed at committed_seq (default: what the
        kernel has received so far); returns the committed sequence."""
        if self.backend is Backend.PATCH:
            return self.patch_gate.guard(sock, committed_seq).commit_seq
        rcv_nxt, wscale = repair.rcv_nxt_and_wscale(sock)
        seq = (rcv_nxt if committed_seq is None else committed_seq) & 0xFFFFFFFF
        self.bpf_gate.guard(self._flow(sock), seq, wscale)
        return seq

    def committed_seq(self, sock: socket.socket) -> int | None:
        """The sequence sock's ACKs may reach at most, or None when sock is not gated."""
        if self.backend is Backend.PATCH:
            info = self.patch_gate.config(sock)
            return info.commit_seq if info.gated else None
        cfg = self.bpf_gate.config(self._flow(sock))
        return cfg.committed_seq if cfg is not None and cfg.guarded else None

    def commit(self, sock: socket.socket, seq: int) -> bool:
        """Allow acknowledging up to seq (end of stream: FIN's seq + 1); an ACK carrying it
        leaves at once. False (nothing changes) when seq is not after the current commit."""
        if self.backend is Backend.PATCH:
            return self.patch_gate.commit(sock, seq)
        return self.bpf_gate.commit(self._flow(sock), seq)

    def forget(self, sock: socket.socket) -> None:
        """Stop gating sock's flow (its stream was committed to the end): the eBPF gate drops
        its map entry; a patched socket's gate ends with the socket."""
        if self.backend is Backend.BPF:
            self.bpf_gate.forget(self._flow(sock))

    def _flow(self, sock: socket.socket) -> Flow:
        flow = self._flows.get(sock)
        if flow is None:
            flow = self._flows[sock] = socket_flow(sock)
        return flow


class GateUnavailable(KernelError):
    """A backend-specific gate was asked of a gate of the other backend, or of a closed one."""


def _closed_or_other(backend: Backend, wanted: Backend) -> GateUnavailable:
    if backend is not wanted:
        return GateUnavailable(f"expected a {wanted.value} gate, got a {backend.value} one")
    return GateUnavailable(f"expected an open {wanted.value} gate, got a closed one")


def open_gate(ifname: str, *, backend: Backend | str | None = None,
              netns: str | None = None, pin_root: Path | None = None) -> Gate:
    """The gate for ifname in netns (both used by bpf only), opened; close() it or use it as a
    context manager.

    backend None: patch when the running kernel has TCP_COMMIT_SEQ, else bpf; "patch" on a
    kernel without it raises OptionAbsent. pin_root: the eBPF gate's maps are pinned there
    and survive this process (kernel/gate.py)."""
    return Gate(select_backend(backend), ifname, netns, pin_root).open()


__all__ = ["Backend", "Gate", "GateUnavailable", "commit_option_present", "open_gate",
           "socket_flow"]
