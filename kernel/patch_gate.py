"""The ACK gate's `patch` backend: the socket options of the kernel series in kernel/patches/.

On a patched kernel the stack itself holds ACKs at the committed sequence (TCP_COMMIT_SEQ),
widens the window so its right edge stays, sends no SACK above the commit and sends the ACK
at once when the commit moves; TCP_ACCEPT_AHEAD is the paper's section 6.1 exception for a
restored socket whose peer acknowledged bytes beyond the checkpoint. Nothing is attached to
an interface: the gate is per socket.

    backend = select_backend()          # Backend.PATCH when the option exists, else Backend.BPF
    gate = PatchGate()
    gate.guard(sock)                    # committed at what the kernel has received so far
    gate.commit(sock, seq)              # -> True when the ACK moved (and an ACK left)
    gate.config(sock).commit_seq

    arm_accept_ahead(restored); ...; accept_ahead(restored).distance
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from dataclasses import dataclass

import structlog

from kernel.errors import KernelError
from kernel.seq import after

log = structlog.get_logger(component="tcpcp.kernel.patch_gate")

# include/uapi/linux/tcp.h of the series (out-of-tree numbers, far above mainline's)
TCP_COMMIT_SEQ = 200
TCP_ACCEPT_AHEAD = 201
TCP_COMMIT_GATED = 1
_COMMIT_INFO = struct.Struct("=IIII")  # struct tcp_commit_info
_ACCEPT_AHEAD = struct.Struct("=II")   # struct tcp_accept_ahead


class Backend(enum.Enum):
    """How the ACK gate is implemented on this host."""

    BPF = "bpf"      # tc egress program + forced ACKs (stock kernels)
    PATCH = "patch"  # TCP_COMMIT_SEQ of the kernel series


class PatchGateError(KernelError):
    """The patch backend was asked something the kernel or the socket refuses."""


class OptionAbsent(PatchGateError):
    """The running kernel does not have the series (its TCP answers ENOPROTOOPT)."""


class CommitRefused(PatchGateError):
    """The kernel refused a committed sequence."""


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """getsockopt(TCP_COMMIT_SEQ): the commit and the stack's receive positions."""

    commit_seq: int
    rcv_nxt: int
    copied_seq: int
    gated: bool

    @classmethod
    def unpack(cls, raw: bytes) -> CommitInfo:
        commit_seq, rcv_nxt, copied_seq, flags = _COMMIT_INFO.unpack(raw)
        return cls(commit_seq, rcv_nxt, copied_seq, bool(flags & TCP_COMMIT_GATED))

    def pack(self) -> bytes:
        return _COMMIT_INFO.pack(self.commit_seq, self.rcv_nxt, self.copied_seq,
                                 TCP_COMMIT_GATED if self.gated else 0)


@dataclass(frozen=True, slots=True)
class AheadInfo:
    """getsockopt(TCP_ACCEPT_AHEAD): how far beyond snd_nxt the accepted ACK was."""

    distance: int
    armed: bool

    @classmethod
    def unpack(cls, raw: bytes) -> AheadInfo:
        distance, armed = _ACCEPT_AHEAD.unpack(raw)
        return cls(distance, bool(armed))


_REFUSALS = {
    errno.EINVAL: "it would move the acknowledgment backwards",
    errno.ERANGE: "it is beyond what the stack has received (rcv_nxt)",
    errno.ENOTCONN: "the socket has no receive sequence yet (not connected)",
}


def refusal_reason(err: int) -> str:
    """Why the kernel refused a TCP_COMMIT_SEQ value, from the errno it answered."""
    return _REFUSALS.get(err, f"errno {errno.errorcode.get(err, err)}")


def _absent_or_raise(exc: OSError, what: str) -> None:
    if exc.errno == errno.ENOPROTOOPT:
        raise OptionAbsent(f"expected a kernel with the tcpcp series ({what}), got "
                           f"ENOPROTOOPT: this kernel lacks it, use the bpf backend") from exc


def commit_option_present() -> bool:
    """True when this kernel's TCP knows TCP_COMMIT_SEQ (the series is applied)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.getsockopt(socket.IPPROTO_TCP, TCP_COMMIT_SEQ, _COMMIT_INFO.size)
        except OSError as exc:
            if exc.errno == errno.ENOPROTOOPT:
                return False
            raise
    return True


def choose_backend(requested: Backend | str | None, option_present: bool) -> Backend:
    """The backend for a request (None or "auto": patch when the kernel has the option, else
    bpf), given whether the running kernel has TCP_COMMIT_SEQ. Pure: no probing.

    Asking for `patch` without the option raises OptionAbsent; an unknown name, ValueError."""
    if requested is None or requested == "auto":
        return Backend.PATCH if option_present else Backend.BPF
    backend = Backend(requested)
    if backend is Backend.PATCH and not option_present:
        raise OptionAbsent("expected TCP_COMMIT_SEQ for the patch backend, got a kernel "
                           "without it (ENOPROTOOPT)")
    return backend


def select_backend(requested: Backend | str | None = None) -> Backend:
    """The backend to use: the one requested, or `patch` when the kernel has it, else `bpf`.

    Asking for `patch` on a kernel without the series raises OptionAbsent."""
    chosen = choose_backend(requested, commit_option_present())
    log.info("gate_backend_selected", backend=chosen.value,
             requested=None if requested is None else str(getattr(requested, "value",
                                                                  requested)))
    return chosen


def _get(sock: socket.socket, option: int, size: int, what: str) -> bytes:
    """getsockopt(IPPROTO_TCP, option) of one of the series' options (OptionAbsent without)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option, size)
    except OSError as exc:
        _absent_or_raise(exc, f"getsockopt {what}")
        raise


def commit_info(sock: socket.socket) -> CommitInfo:
    return CommitInfo.unpack(_get(sock, TCP_COMMIT_SEQ, _COMMIT_INFO.size, "TCP_COMMIT_SEQ"))


def set_commit(sock: socket.socket, seq: int) -> None:
    """setsockopt(TCP_COMMIT_SEQ, seq): gate the socket and commit up to seq."""
    seq &= 0xFFFFFFFF
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_COMMIT_SEQ, struct.pack("=I", seq))
    except OSError as exc:
        _absent_or_raise(exc, "setsockopt TCP_COMMIT_SEQ")
        if exc.errno in _REFUSALS:
            raise CommitRefused(f"expected the kernel to accept commit {seq}, got "
                                f"{errno.errorcode[exc.errno]}: "
                                f"{refusal_reason(exc.errno)}") from exc
        raise


def arm_accept_ahead(sock: socket.socket, armed: bool = True) -> None:
    """Accept (once) the first ACK beyond snd_nxt: for a socket restored from a checkpoint."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ACCEPT_AHEAD, 1 if armed else 0)
    except OSError as exc:
        _absent_or_raise(exc, "setsockopt TCP_ACCEPT_AHEAD")
        raise


def accept_ahead(sock: socket.socket) -> AheadInfo:
    """Whether the socket still waits for an ACK beyond snd_nxt, and how far the last was."""
    return AheadInfo.unpack(_get(sock, TCP_ACCEPT_AHEAD, _ACCEPT_AHEAD.size,
                                 "TCP_ACCEPT_AHEAD"))


class PatchGate:
    """The ACK gate on a patched kernel, with the eBPF gate's verbs keyed by socket."""

    def __init__(self) -> None:
        if not commit_option_present():
            raise OptionAbsent("expected TCP_COMMIT_SEQ for PatchGate, got a kernel without "
                               "it (ENOPROTOOPT)")

    def guard(self, sock: socket.socket, committed_seq: int | None = None) -> CommitInfo:
        """Gate sock from now on, committed at committed_seq (default: what the kernel has
        received so far, which it may already have acknowledged)."""
        seq = commit_info(sock).rcv_nxt if committed_seq is None else committed_seq
        set_commit(sock, seq)
        info = commit_info(sock)
        log.info("socket_guarded", fd=sock.fileno(), committed=info.commit_seq)
        return info

    def guard_listen(self, listener: socket.socket) -> None:
        """Every connection listener accepts from now on is gated from its first byte."""
        set_commit(listener, 0)

    def config(self, sock: socket.socket) -> CommitInfo:
        return commit_info(sock)

    def commit(self, sock: socket.socket, seq: int) -> bool:
        """Allow acknowledging up to seq (end of stream: FIN's seq + 1); the kernel sends the
        ACK itself. False when seq is not after the current commit (nothing changes)."""
        seq &= 0xFFFFFFFF
        info = commit_info(sock)
        if not info.gated:
            raise PatchGateError(f"expected a guarded socket to commit {seq}, got an "
                                 f"ungated one (fd {sock.fileno()})")
        if not after(seq, info.commit_seq):
            return False
        try:
            set_commit(sock, seq)
        except CommitRefused:
            # a concurrent commit may have passed seq since it was read: nothing left to do
            if not after(seq, commit_info(sock).commit_seq):
                return False
            raise
        return True
