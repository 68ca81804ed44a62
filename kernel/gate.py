"""The ACK gate: inbound bytes of a guarded connection are acknowledged only once the application
has committed them (DESIGN.md section 4).

    with AckGate("eth0", netns="lab-origin") as gate:
        gate.guard(flow, committed_seq=rcv_nxt, rcv_wscale=ws)   # or gate.guard_listen(port)
        ...application reads and checkpoints...
        gate.commit(flow, new_rcv_nxt)   # moves the committed sequence, forces an ACK at once
        gate.freeze(flow) / gate.thaw(flow)   # drop / let through every egress segment
        gate.counters(flow); gate.state(flow); gate.forget(flow)

    AckGate("eth0", netns=..., pin_root=GATE_PIN_ROOT)   # state survives a killed process

The BPF program (kernel/bpf/gate.bpf.c) does the rewriting at tc egress; this class writes its
configuration map, reads its state map and sends the forced ACKs (kernel/forced_ack.py). A second,
small program at tc ingress takes the SACK-permitted option out of SYNs to guarded ports.

SACK is off per guarded flow, never for the namespace. The gate strips SACK blocks (they would
tell the peer about bytes beyond the commit), and a peer that negotiated SACK but never sees a
block recovers every loss by its retransmission timer (200 ms stalls were measured). So on a
guarded port neither end negotiates SACK: the SYN's SACK-permitted option becomes NOPs at ingress
(the local kernel counts duplicate ACKs for its own sending, like the peer) and the SYN-ACK's at
egress (the peer never expects blocks). Unguarded connections in the namespace keep SACK.

A flow guarded mid-connection (`guard` on an established socket) has SACK negotiated already and
keeps it: it cannot be renegotiated, and its blocks are stripped like any other. Its peer then
recovers losses of the bytes it sends us only by its retransmission timer (measured, lab, 10
uploads of 50 MB losing 1 in 4096 data segments: 83 timeouts and 24 s, against 0-2 timeouts and
5 s for flows guarded from the SYN-ACK; no stall on a loss-free path); guard connections from
their SYN-ACK (`guard_listen`) wherever throughput under loss matters.

While the commit is behind a hole the kernel's duplicate ACKs are clamped below it, so the peer
cannot count them; a commit that reaches the hole repeats them (`dupacks_to_replay`).

With pin_root the maps live in bpffs and a killed process leaves filters and maps in place (flows
held at their last commit); the next gate on the same interface and namespace reuses the maps and
swaps its programs into the filters. What it cannot take over: the TCP Fast Open setting saved by
the first `guard_listen`, so after a restart a clean detach leaves Fast Open's server side off.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from kernel import bpfbuild
from kernel.bpf import layout
from kernel.bpf.layout import GATE_FROZEN, GATE_GUARDED, Flow, flow_key
from kernel.errors import KernelError
from kernel.forced_ack import AckSpec, RawSender, ack_window
from kernel.libbpf import BpfMap, BpfObject
from kernel.netns import entered
from kernel.seq import after
from kernel.tcfilter import Direction, TcHook, TcTarget

log = structlog.get_logger(component="tcpcp.kernel.gate")

GATE_PRIORITY = 0xAC00
# A clamped ACK repeating what the wire already carries is dropped within this time of the flow's
# last segment (it would only feed the peer's duplicate-ACK count); later it answers a keepalive.
DUP_HOLDOFF_S = 1.0
MAX_WSCALE = 14
# Duplicate ACKs repeated after a forced ACK that reaches a hole (more than the peer's
# fast-retransmit threshold of 3, in case it has raised its reordering estimate).
DUPACK_REPLAY_MAX = 8
_TFO_SYSCTL = "net/ipv4/tcp_fastopen"
# TFO_SERVER_ENABLE | TFO_SERVER_COOKIE_NOT_REQD | TFO_SERVER_WO_SOCKOPT (include/net/tcp.h)
_TFO_SERVER_BITS = 0x2 | 0x200 | 0x400
GATE_PIN_ROOT = Path("/sys/fs/bpf/tcpcp")
# The state a restarted gate takes over (walk_scratch is per-packet scratch, never pinned).
PINNED_MAPS = ("gate_flows", "gate_states", "guarded_ports", "gate_settings")


def mount_type(path: Path) -> str:
    """File system type of the mount holding path ("bpf" for bpffs), from /proc/self/mounts."""
    best, fstype = "", "none"
    target = str(path.resolve()) if path.exists() else str(path)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def on_bpffs(path: Path) -> bool:
    return mount_type(path) == "bpf"


def dupacks_to_replay(committed_seq: int, st: GateState) -> int:
    """How many copies of the forced ACK to send after it, as duplicate ACKs.

    The kernel answers data arriving after a hole (a loss) with duplicate ACKs at the hole, but
    while the commit is behind the hole the gate clamps them below it, so the peer has none to
    count towards fast retransmit and, after a loss at the end of a burst, waits for its
    retransmission timer. A commit that reaches the kernel's ack while the kernel has sent
    duplicates of it repeats them (capped), as the peer would have received them ungated."""
    if committed_seq != st.kernel_ack:
        return 0
    return min(st.kernel_dupacks, DUPACK_REPLAY_MAX)


class GateError(KernelError):
    """The ACK gate was asked something that does not fit the flow's state."""


@dataclass(frozen=True, slots=True)
class GateState:
    """What the gate saw and did for one flow (sequence values in host byte order)."""

    snd_nxt: int
    kernel_ack: int
    rcv_edge: int
    ack_sent: int
    tsval: int | None
    tsecr: int
    rcv_wscale: int
    packets: int
    acks_clamped: int
    sack_stripped: int
    windows_capped: int
    frozen_dropped: int
    tsvals_raised: int
    dupacks_dropped: int
    kernel_dupacks: int  # the kernel's duplicate ACKs since its ack last moved


@dataclass(frozen=True, slots=True)
class GateCounters:
    """Per-flow counters kept by the BPF program."""

    packets: int
    acks_clamped: int
    sack_stripped: int
    windows_capped: int
    frozen_dropped: int
    tsvals_raised: int
    dupacks_dropped: int


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """What userspace told the gate about one flow."""

    committed_seq: int
    rcv_wscale: int
    guarded: bool
    frozen: bool


class AckGate:
    """The egress gate on one interface, attached while the context is open."""

    def __init__(self, ifname: str, netns: str | None = None,
                 priority: int = GATE_PRIORITY, dup_holdoff_s: float = DUP_HOLDOFF_S,
                 pin_root: Path | None = None) -> None:
        """pin_root (e.g. GATE_PIN_ROOT, on a mounted bpffs): keep the maps pinned under
        pin_root/<netns inode>/<ifname>/ so a restarted process takes over the state and the
        filters a killed one left behind (see `reattached`); None: the maps die with the gate."""
        self.ifname = ifname
        self.pin_root = pin_root
        self.reattached = False  # __enter__ found the pinned maps of an earlier gate
        self.dup_holdoff_s = dup_holdoff_s
        self.netns = netns
        self._priority = priority
        self._lock = threading.Lock()
        self._obj: BpfObject | None = None
        self._hook: TcHook | None = None
        self._syn_hook: TcHook | None = None
        self._sender: RawSender | None = None
        self._sysctl_saved: dict[str, str] = {}
        self.log = log.bind(ifname=ifname, netns=netns)

    # ------------------------------------------------------------------ lifecycle
    @property
    def pin_dir(self) -> Path | None:
        """Where this gate's maps are pinned (None: not pinned)."""
        if self.pin_root is None:
            return None
        ns = Path(f"/var/run/netns/{self.netns}") if self.netns else Path("/proc/self/ns/net")
        return self.pin_root / str(ns.stat().st_ino) / self.ifname

    def _pins(self) -> dict[str, str]:
        pin_dir = self.pin_dir
        if pin_dir is None:
            return {}
        if not on_bpffs(pin_dir):
            raise GateError(f"expected {pin_dir} on a mounted bpffs (mount -t bpf bpf "
                            f"/sys/fs/bpf), got {mount_type(pin_dir)}")
        pin_dir.mkdir(parents=True, exist_ok=True)
        self.reattached = all((pin_dir / m).exists() for m in PINNED_MAPS)
        return {m: str(pin_dir / m) for m in PINNED_MAPS}

    def __enter__(self) -> AckGate:
        try:
            self._obj = BpfObject(bpfbuild.object_bytes("gate"), "gate", pins=self._pins())
            self._flows = self._obj.map("gate_flows")
            self._states = self._obj.map("gate_states")
            self._ports = self._obj.map("guarded_ports")
            holdoff = layout.new("struct gate_settings",
                                 dup_holdoff_ns=int(self.dup_holdoff_s * 1e9))
            self._obj.map("gate_settings").update(struct.pack("=I", 0), layout.to_bytes(holdoff))
            self._sender = RawSender(self.netns)
            # pinned: take over the filters a killed gate left, in one step (no ungated gap)
            pinned = self.pin_root is not None
            self._hook = TcHook(TcTarget(self.ifname, Direction.EGRESS, self._priority,
                                         self.netns),
                                self._obj.program_fd("gate_egress"), "tcpcp_gate",
                                replace=pinned)
            self._syn_hook = TcHook(TcTarget(self.ifname, Direction.INGRESS, self._priority,
                                             self.netns),
                                    self._obj.program_fd("gate_syn_ingress"), "tcpcp_gate_syn",
                                    replace=pinned)
        except BaseException:
            self._teardown(unpin=not self.reattached)  # never lose a killed gate's state
            raise
        if self.reattached:
            self.log.info("gate_reattached", pin_dir=str(self.pin_dir),
                          filter_taken_over=self._hook.took_over)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove the program from the interface and unload it (pinned maps are unpinned);
        guarded flows become ungated.

        A process killed without detaching leaves the filter attached with its maps: its flows
        stay gated at their last commit, which is the safe side. With pin_root, the next gate on
        the same interface and namespace takes them over."""
        self._teardown(unpin=True)

    def leave(self) -> None:
        """Close this process's handles but leave the filter attached and the maps pinned (only
        with pin_root): guarded flows stay gated at their last commit, and the next gate with
        the same pin_root on this interface and namespace takes them over. What a daemon does
        on SIGTERM: stopping must never release an ACK that was not committed."""
        if self.pin_root is None:
            raise GateError("leave() needs pin_root: an unpinned gate's state dies with it")
        self._syn_hook = self._hook = None  # attached filters stay, holding the program
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        self.log.info("gate_left_attached", pin_dir=str(self.pin_dir))

    def _teardown(self, unpin: bool) -> None:
        for hook in (self._syn_hook, self._hook):
            if hook is not None:
                hook.detach()
        self._syn_hook = self._hook = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._obj is not None:
            if unpin:
                self._obj.unpin()
            self._obj.close()
            self._obj = None
            pin_dir = None
            with contextlib.suppress(OSError):  # the namespace may be gone already
                pin_dir = self.pin_dir
            if unpin and pin_dir is not None:
                for d in (pin_dir, pin_dir.parent):
                    with contextlib.suppress(OSError):  # not empty: other gates' pins
                        d.rmdir()
        for key, value in self._sysctl_saved.items():
            try:
                self._write_sysctl(key, value)
            except (OSError, KernelError) as exc:  # the namespace may be gone already
                self.log.info("sysctl_restore_skipped", key=key, reason=str(exc))
        self._sysctl_saved.clear()

    def _live(self) -> BpfObject:
        if self._obj is None:
            raise GateError("expected an open AckGate (use it as a context manager), "
                            "got a closed one")
        return self._obj

    # ------------------------------------------------------------------ configuration
    def guard(self, flow: Flow, committed_seq: int, rcv_wscale: int) -> None:
        """Gate flow from now on: nothing after committed_seq is acknowledged.

        committed_seq is the receive sequence the application has committed (normally the
        socket's rcv_nxt when guarding starts); rcv_wscale the flow's receive window scale."""
        if not 0 <= rcv_wscale <= MAX_WSCALE:
            raise GateError(f"rcv_wscale must be 0..{MAX_WSCALE}, got {rcv_wscale}")
        self._write(flow, FlowConfig(committed_seq & 0xFFFFFFFF, rcv_wscale, True, False))
        self.log.info("flow_guarded", flow=str(flow), committed=committed_seq, wscale=rcv_wscale)

    def guard_listen(self, port: int) -> None:
        """Gate every connection accepted on local port from its SYN-ACK on.

        Such connections negotiate no SACK (see the module docstring). One setting of the
        namespace changes until detach: TCP Fast Open's server side goes off (a SYN-ACK would
        acknowledge the data of a Fast Open SYN before any commit)."""
        self._live()
        self._ports.update(struct.pack("=I", port), struct.pack("=I", 1))
        self._override_sysctl(_TFO_SYSCTL, lambda v: v & ~_TFO_SERVER_BITS)
        self.log.info("port_guarded", port=port)

    def unguard_listen(self, port: int) -> None:
        """New connections on port are no longer gated (existing entries stay)."""
        self._live()
        self._ports.delete(struct.pack("=I", port))

    def config(self, flow: Flow) -> FlowConfig | None:
        """The flow's gate configuration, or None when the flow is not in the gate."""
        raw = self._flows_map().lookup(flow_key(flow))
        if raw is None:
            return None
        c = layout.from_bytes("struct gate_config", raw)
        return FlowConfig(c.committed_seq, c.rcv_wscale, bool(c.flags & GATE_GUARDED),
                          bool(c.flags & GATE_FROZEN))

    def commit(self, flow: Flow, seq: int) -> bool:
        """Allow acknowledging up to seq (end of stream: FIN's seq + 1) and force an ACK.

        A commit at or before the current committed sequence changes nothing and returns False;
        otherwise the gate moves and an ACK carrying seq leaves at once."""
        seq &= 0xFFFFFFFF
        with self._lock:
            cfg = self.config(flow)
            if cfg is None or not cfg.guarded:
                raise GateError(f"expected a guarded flow to commit {flow}, got {cfg}")
            if not after(seq, cfg.committed_seq):
                return False
            cfg = FlowConfig(seq, cfg.rcv_wscale, True, cfg.frozen)
            self._write_locked(flow, cfg)
            # sent under the lock: a concurrent commit's higher ACK cannot leave before this one
            if not cfg.frozen:
                self._send_ack(flow, cfg)
        return True

    def force_ack(self, flow: Flow) -> bool:
        """Send a pure ACK at the committed sequence now; False when nothing was sent yet."""
        with self._lock:
            cfg = self.config(flow)
            return cfg is not None and self._send_ack(flow, cfg)

    def _send_ack(self, flow: Flow, cfg: FlowConfig) -> bool:
        st = self.state(flow)
        if st is None or self._sender is None:
            return False
        spec = AckSpec(flow, st.snd_nxt, cfg.committed_seq,
                       ack_window(st.rcv_edge, cfg.committed_seq, cfg.rcv_wscale),
                       st.tsval, st.tsecr)
        self._sender.send(spec)
        for _ in range(dupacks_to_replay(cfg.committed_seq, st)):
            self._sender.send(spec)
        return True

    def freeze(self, flow: Flow) -> None:
        """Drop every egress segment of flow (planned passing, self-fencing)."""
        self._set_frozen(flow, True)
        self.log.info("flow_frozen", flow=str(flow))

    def thaw(self, flow: Flow) -> None:
        """Let the flow's segments out again (still gated)."""
        self._set_frozen(flow, False)
        self.log.info("flow_thawed", flow=str(flow))

    def forget(self, flow: Flow) -> None:
        """Remove flow from the gate (its segments pass untouched from now on)."""
        key = flow_key(flow)
        with self._lock:
            self._flows_map().delete(key)
            self._states.delete(key)

    def state(self, flow: Flow) -> GateState | None:
        """What BPF recorded for flow, or None before its first egress segment."""
        self._live()
        raw = self._states.lookup(flow_key(flow))
        if raw is None:
            return None
        s = layout.from_bytes("struct gate_state", raw)
        return GateState(s.snd_nxt, s.kernel_ack, s.rcv_edge, s.ack_sent,
                         s.tsval if s.has_ts else None, s.tsecr, s.rcv_wscale, s.packets,
                         s.acks_clamped, s.sack_stripped, s.windows_capped, s.frozen_dropped,
                         s.tsvals_raised, s.dupacks_dropped, s.kernel_dupacks)

    def counters(self, flow: Flow) -> GateCounters:
        """How many segments of flow the gate saw, clamped, stripped, capped, dropped (frozen),
        raised (TSval) and dropped as duplicate clamped ACKs."""
        st = self.state(flow)
        if st is None:
            return GateCounters(0, 0, 0, 0, 0, 0, 0)
        return GateCounters(st.packets, st.acks_clamped, st.sack_stripped, st.windows_capped,
                            st.frozen_dropped, st.tsvals_raised, st.dupacks_dropped)

    # ------------------------------------------------------------------ internals
    def _flows_map(self) -> BpfMap:
        self._live()
        return self._flows

    def _set_frozen(self, flow: Flow, frozen: bool) -> None:
        with self._lock:
            cfg = self.config(flow)
            if cfg is None:
                raise GateError(f"expected flow {flow} in the gate to (un)freeze it, found none")
            self._write_locked(flow, FlowConfig(cfg.committed_seq, cfg.rcv_wscale, cfg.guarded,
                                                frozen))

    def _write(self, flow: Flow, cfg: FlowConfig) -> None:
        with self._lock:
            self._write_locked(flow, cfg)

    def _write_locked(self, flow: Flow, cfg: FlowConfig) -> None:
        flags = (GATE_GUARDED if cfg.guarded else 0) | (GATE_FROZEN if cfg.frozen else 0)
        value = layout.new("struct gate_config", committed_seq=cfg.committed_seq,
                           rcv_wscale=cfg.rcv_wscale, flags=flags)
        self._flows_map().update(flow_key(flow), layout.to_bytes(value))

    def _override_sysctl(self, key: str, change: Callable[[int], int]) -> None:
        if key in self._sysctl_saved:
            return
        current = self._read_sysctl(key)
        wanted = change(int(current))
        if wanted != int(current):
            self._sysctl_saved[key] = current
            self._write_sysctl(key, str(wanted))
            self.log.info("sysctl_overridden", key=key, was=current, now=wanted)

    def _read_sysctl(self, key: str) -> str:
        with entered(self.netns):
            return Path("/proc/sys", key).read_text().strip()

    def _write_sysctl(self, key: str, value: str) -> None:
        with entered(self.netns):
            Path("/proc/sys", key).write_text(value)
