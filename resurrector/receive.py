"""The destination half of planned passing: verify, restore silently, report, activate.

    receiver = Receiver(Acceptance("standby", frozenset({"origin"})), keyring, policy)
    live = receiver.serve(transfer_socket)      # in a worker thread, never on an event loop

serve() reads one signed BATCH (kernel/transfer.py) with deadlines (kernel/channel.py). Before
anything is touched it checks the frame's size against limits derived from the restore policy,
its signature, and its envelope (this host as destination, an accepted origin, a fresh
timestamp, a nonce never seen, an epoch not below the last one). Each connection is then
decoded, its application state checked by the application's own `accept_state`, and restored in
repair mode (kernel/repair.py; the policy refuses addresses this host does not serve). The
signed REPORT names every index once, restored or refused with the reason. On ACTIVATE the
restored sockets leave repair mode (a window probe wakes the peer) and the signed DONE says
which went live; on ABORT, a bad frame or silence they are discarded silently (closed in repair
mode). This host's isolation of a flow (left from passing it away earlier) is lifted only for
connections restored, at activation.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from kernel import channel, codec, repair, transfer
from kernel.errors import KernelError
from kernel.ici import Identity
from kernel.isolation import FlowIsolation
from kernel.sanity import RestorePolicy
from kernel.transfer import Acceptance, Frame, Kind, Limits, Outcome, ReplayGuard, Signer

log = structlog.get_logger(component="tcpcp.resurrector.receive")


@dataclass(frozen=True, slots=True)
class ReceiveFaults:
    """Fault injection for tests: fail `step` ("restore" or "activate") for item `index`, or
    ("no_done") activate everything but never answer DONE."""

    step: str = ""
    index: int = 0


class Receiver:
    """Accepts passed connections for one host; serve() may run in several threads at once."""

    def __init__(self, acceptance: Acceptance, signer: Signer, policy: RestorePolicy, *,
                 limits: Limits | None = None, isolation: FlowIsolation | None = None,
                 accept_state: Callable[[bytes], object] | None = None,
                 ts_margin_ms: int = repair.DEFAULT_TS_MARGIN_MS,
                 timeout_s: float = 30.0, grace_s: float = 1.0) -> None:
        self.signer = signer
        self.policy = policy
        self.limits = limits or Limits.for_policy(policy)
        self.isolation = isolation
        self.accept_state = accept_state
        self.ts_margin_ms = ts_margin_ms
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._guard = ReplayGuard(acceptance)
        self._lock = threading.Lock()

    def serve(self, ctl: socket.socket, *, faults: ReceiveFaults | None = None,
              adopt: Callable[[list[tuple[socket.socket, bytes]]], None] | None = None
              ) -> list[tuple[socket.socket, bytes]]:
        """One pass on an accepted transfer connection; returns the live sockets with their
        application states ([] when aborted). TransferError when the batch itself is refused.

        adopt(live) hands the live sockets to the application before DONE is answered, so once
        the origin hears DONE the connections are served here (and can be passed on again)."""
        faults = faults or ReceiveFaults()
        batch = channel.recv_frame(ctl, Kind.BATCH, self.signer, self.limits,
                                   timeout_s=self.timeout_s)
        env = batch.envelope
        with self._lock:
            self._guard.check_batch(env, time.time_ns() // 1_000_000)
        rlog = log.bind(origin=env.origin, epoch=env.epoch, nonce=env.nonce.hex()[:8],
                        count=len(batch.items))
        restored: list[tuple[int, repair.Restored, bytes]] = []
        refused: list[tuple[int, str]] = []
        now_ms = time.time_ns() // 1_000_000
        for i, item in enumerate(batch.items):
            try:
                if faults.step == "restore" and faults.index == i:
                    raise KernelError("injected fault: restore refused")
                ici = codec.decode(item.ici)
                if self.accept_state is not None:
                    try:
                        self.accept_state(item.app_state)
                    except (ValueError, TypeError, KeyError) as exc:
                        raise KernelError(f"application state refused: {exc}") from exc
                restored.append((i, repair.restore(ici, self.policy, now_ms=now_ms,
                                                   ts_margin_ms=self.ts_margin_ms),
                                 item.app_state))
            except KernelError as exc:
                refused.append((i, str(exc)))
                rlog.warning("connection_refused", index=i, error=str(exc))
        try:
            if self.isolation is not None and restored:
                # from here the traffic may be switched: until activation no peer segment may
                # reach a socket in repair mode (it would be acknowledged, and lost if the pass
                # is undone), nor, once discarded, no socket at all (RST)
                self.isolation.quarantine([r.ici.identity for _, r, _ in restored])
        except KernelError as exc:
            self._discard(restored)
            rlog.error("quarantine_failed", error=str(exc), discarded=len(restored))
            refused += [(i, f"quarantine failed: {exc}") for i, _, _ in restored]
            restored = []
        try:
            channel.send_frame(ctl, self._answer(Kind.REPORT, env, Outcome(
                tuple(i for i, _, _ in restored), tuple(refused))), timeout_s=self.timeout_s)
            word = channel.recv_frame(ctl, (Kind.ACTIVATE, Kind.ABORT), self.signer,
                                      self.limits, timeout_s=self.timeout_s)
            transfer.check_answer(word, env)
        except (OSError, KernelError) as exc:
            self._discard(restored)
            rlog.warning("pass_abandoned", error=str(exc), discarded=len(restored))
            return []
        if word.kind is Kind.ABORT:
            self._discard(restored)
            rlog.info("pass_aborted", reason=word.reason, discarded=len(restored))
            return []
        live: list[tuple[socket.socket, bytes]] = []
        failed: list[tuple[int, str]] = []
        for i, r, state in restored:
            clog = rlog.bind(conn=str(r.ici.identity))
            try:
                if faults.step == "activate" and faults.index == i:
                    raise KernelError("injected fault: activation refused")
                live.append((repair.activate(r), state))
            except KernelError as exc:
                if self._silent(r.sock):
                    repair.discard_restored(r)
                    failed.append((i, str(exc)))
                    clog.warning("activation_failed", error=str(exc))
                    continue
                live.append((r.sock, state))  # out of repair mode: live here, whatever failed
                clog.error("activated_with_error", error=str(exc))
            self._unquarantine([r.ici.identity])
        self._unquarantine_later([r.ici.identity for i, r, _ in restored if i in dict(failed)])
        if adopt is not None and live:
            try:
                adopt(live)
            except Exception as exc:  # live here whatever the application did with them
                rlog.error("adopt_failed", error=str(exc), live=len(live))
        if faults.step != "no_done":
            with contextlib.suppress(OSError, KernelError):
                channel.send_frame(ctl, self._answer(Kind.DONE, env, Outcome(
                    tuple(i for i, r, _ in restored if i not in dict(failed)), tuple(failed))))
        rlog.info("pass_received", activated=len(live), refused=len(refused),
                  failed=len(failed))
        return live

    @staticmethod
    def _silent(sock: socket.socket) -> bool:
        try:
            return bool(sock.getsockopt(repair.SOL_TCP, repair.TCP_REPAIR))
        except OSError:
            return False

    def _answer(self, kind: Kind, env: transfer.Envelope, outcome: Outcome) -> bytes:
        return transfer.encode(Frame(kind, env.reply(time.time_ns() // 1_000_000),
                                     outcome=outcome), self.signer)

    def _discard(self, restored: list[tuple[int, repair.Restored, bytes]]) -> None:
        """Close restored sockets silently; their quarantine stays for the grace period, so a
        straggler of the flow meets no socket-less host (which would answer RST)."""
        for _, r, _ in restored:
            repair.discard_restored(r)
        self._unquarantine_later([r.ici.identity for _, r, _ in restored])

    def _unquarantine(self, flows: list[Identity]) -> None:
        if self.isolation is not None and flows:
            try:
                self.isolation.remove(flows)
            except KernelError as exc:
                log.error("quarantine_not_lifted", error=str(exc), flows=len(flows))

    def _unquarantine_later(self, flows: list[Identity]) -> None:
        if self.isolation is None or not flows:
            return
        generations = {f: self.isolation.generation_of(f) for f in flows}
        isolation = self.isolation

        def lift() -> None:
            for f, gen in generations.items():
                try:
                    isolation.remove([f], generation=gen)
                except KernelError as exc:
                    log.warning("quarantine_not_lifted", conn=str(f), error=str(exc))

        timer = threading.Timer(self.grace_s, lift)
        timer.daemon = True
        timer.start()
