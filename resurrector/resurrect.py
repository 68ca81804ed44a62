"""Resurrecting an origin's connections on this host from their last checkpoints (DESIGN.md
section 6, steps 3 to 5): the shell around the pure planner.

    results = resurrect(checkpoints, ifname="eth0", policy=RestorePolicy.serving(service),
                        take_over=move_traffic, output_log=read_log)
    for r in results:
        r.sock, r.resume_consumed, r.resume_produced      # a Resurrected: hand it over
        r.reason                                          # a Skipped: why, nothing restored

In order, for all connections at once:
1. each record's ICI decoded and checked against the restore policy (an address this host does
   not serve, a queue too large: skipped with the reason);
2. every flow quarantined at this host's ingress (kernel/quarantine.py) *before* the traffic
   moves here: a segment of the peer's must never meet a host without its socket (a RST);
3. take_over(): the traffic moves here (address, route or per-flow rules: the caller's);
4. every peer probed (kernel/probe.py) and its answer read from the quarantine; a peer that does
   not answer is probed again, then skipped ("no answer");
5. the send side pinned on the peer's acknowledgement: the checkpoint's snd_una is the sequence
   of stream position `produced`; the peer acknowledged `ack`, i.e. position
   produced + (ack - snd_una). With logged output the bytes from there to `produced` come back
   from the store's output log and go in as unsent; with regenerable output the application
   resumes writing at that position (it regenerates, or skips what the peer already has);
6. the plan (resurrector/planner.py), the restore in repair mode, the gate (when given) set at
   the committed sequence, the quarantine released, repair off: the unsent bytes leave at once.

Nothing is restored half-way: a connection that fails any step is discarded silently (repair
mode, no FIN, no RST) and reported Skipped; the others go on.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from kernel import codec, repair
from kernel.bpf.layout import Flow
from kernel.errors import KernelError
from kernel.gatebackend import Gate
from kernel.ici import Family, Ici
from kernel.probe import raw_socket, send_probe, wake_peer
from kernel.quarantine import Observation, Quarantine
from kernel.sanity import IciRejected, RestorePolicy, check
from kernel.seq import seq_diff
from resurrector.planner import Output, PlanRefused, RestorePlan, plan_restore
from store.record import Checkpoint

log = structlog.get_logger(component="tcpcp.resurrector.resurrect")

TS_MARGIN_MS = 100
"""Added to the timestamp-clock estimate: covers the clocks' drift and the time to restore."""


@dataclass(frozen=True, slots=True)
class Resurrected:
    """A connection restored and active here. resume_consumed / resume_produced: the stream
    positions the application continues from (the checkpoint's consumed; the position the
    peer acknowledged, or the checkpoint's produced when logged bytes were queued again)."""

    conn: str
    sock: socket.socket
    checkpoint: Checkpoint
    plan: RestorePlan
    resume_consumed: int
    resume_produced: int


@dataclass(frozen=True, slots=True)
class Skipped:
    conn: str
    reason: str


Result = Resurrected | Skipped
OutputLog = Callable[[Checkpoint, int], bytes]
"""(checkpoint, from position) -> the logged outbound bytes from there to its produced."""


def flow_of(ici: Ici) -> Flow:
    ident = ici.identity
    return Flow.of((str(ident.local_ip), ident.local_port), (str(ident.peer_ip),
                                                             ident.peer_port))


def pin_send_side(ici: Ici, produced: int, ack: int) -> tuple[Ici, int]:
    """The checkpoint's ICI with snd_una at the peer's ack, and the stream position that ack
    stands for (see the module docstring, step 5). Pure."""
    position = produced + seq_diff(ack, ici.snd_una)
    if position < 0:
        raise PlanRefused("peer ack", f"expected an ack within the stream, got {ack}: "
                          f"{-position} bytes before its start")
    return replace(ici, snd_una=ack), position


def resurrect(checkpoints: Sequence[Checkpoint], *, ifname: str, policy: RestorePolicy,
              take_over: Callable[[], object], outputs: Callable[[Checkpoint], Output],
              output_log: OutputLog | None = None, gate: Gate | None = None,
              netns: str | None = None, probe_timeout_s: float = 1.0, probes: int = 3,
              timeline: Callable[[str], None] | None = None,
              quarantine: Quarantine | None = None) -> list[Result]:
    """Restore the connections of `checkpoints` here (see the module docstring). quarantine:
    one already attached to ifname (a watching resurrector keeps one: loading it costs about
    100 ms of the failover); else one is attached for this call."""
    mark = timeline or (lambda _: None)
    results: list[Result] = []
    wanted: list[tuple[Checkpoint, Ici, Flow]] = []
    for cp in checkpoints:
        try:
            ici = codec.decode(cp.ici)
            check(ici, policy)
        except (KernelError, IciRejected, ValueError) as exc:
            results.append(_skip(cp.conn, f"refused: {exc}"))
            continue
        wanted.append((cp, ici, flow_of(ici)))
    with contextlib.nullcontext(quarantine) if quarantine is not None else \
            Quarantine(ifname, netns=netns) as q:
        for _, _, flow in wanted:
            q.observe(flow)
        mark("quarantined")
        take_over()
        mark("traffic_moved")
        answers = _probe_all(q, wanted, probe_timeout_s, probes)
        mark("probed")
        for cp, ici, flow in wanted:
            answer = answers.get(cp.conn)
            if answer is None:
                results.append(_skip(cp.conn, f"no answer to {probes} probes in "
                                     f"{probe_timeout_s * probes:g} s (the peer is gone, or "
                                     "its path does not lead here)"))
                q.release(flow)
                continue
            results.append(_restore_one(q, cp, ici, flow, answer, policy, outputs(cp),
                                        output_log, gate))
        mark("restored")
    return results


def _skip(conn: str, reason: str) -> Skipped:
    log.warning("connection_skipped", conn=conn, reason=reason)
    return Skipped(conn, reason)


def _probe_all(q: Quarantine, wanted: list[tuple[Checkpoint, Ici, Flow]], timeout_s: float,
               probes: int) -> dict[str, Observation]:
    answers: dict[str, Observation] = {}
    pending = {cp.conn: (ici, flow) for cp, ici, flow in wanted}
    for _ in range(probes):
        if not pending:
            break
        before = {conn: _packets(q.observed(flow)) for conn, (_, flow) in pending.items()}
        now_ms = time.time_ns() // 1_000_000
        raws: dict[Family, socket.socket] = {}
        try:
            for ici, _ in pending.values():
                family = ici.identity.family
                if family not in raws:
                    raws[family] = raw_socket(family)
                send_probe(ici, ici.timestamp.estimate(now_ms, TS_MARGIN_MS), raws[family])
        finally:
            for raw in raws.values():
                raw.close()
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for conn, (_, flow) in list(pending.items()):
                seen = q.observed(flow)
                # the answer is a pure ACK (seq = the peer's snd_nxt); a retransmission of the
                # peer's may arrive meanwhile (seq = its snd_una): probed again, not taken
                if seen is not None and seen.packets > before[conn] \
                        and seen.end_seq == seen.seq:
                    answers[conn] = seen
                    del pending[conn]
            if pending:
                time.sleep(0.001)
    return answers


def _packets(seen: Observation | None) -> int:
    return 0 if seen is None else seen.packets


def _restore_one(q: Quarantine, cp: Checkpoint, ici: Ici, flow: Flow, answer: Observation,
                 policy: RestorePolicy, output: Output, output_log: OutputLog | None,
                 gate: Gate | None) -> Result:
    restored = None
    try:
        pinned, position = pin_send_side(ici, cp.outbound_produced, answer.ack)
        resume_produced = position
        if output is Output.LOGGED and position < cp.outbound_produced:
            if output_log is None:
                raise PlanRefused("output log", "expected the logged outbound bytes, got no "
                                  "output log to read them from")
            missing = output_log(cp, position)
            want = cp.outbound_produced - position
            if len(missing) != want:
                raise PlanRefused("output log", f"expected {want} logged bytes from position "
                                  f"{position}, got {len(missing)}")
            pinned = replace(pinned, unsent=missing)
            resume_produced = cp.outbound_produced
        now_ms = time.time_ns() // 1_000_000
        plan = plan_restore(pinned, answer, output=output, now_ms=now_ms,
                            margin_ms=TS_MARGIN_MS)
        restored = repair.restore(plan.ici, policy, now_ms=now_ms, ts_margin_ms=0)
        if gate is not None:
            gate.guard(restored.sock, plan.ici.rcv_nxt)
        q.release(flow)
        sock = repair.activate(restored)
        if plan.peer_holds:  # the peer holds bytes for us: make it resend them now
            wake_peer(plan.ici)
    except (PlanRefused, KernelError, IciRejected, OSError) as exc:
        if restored is not None:
            repair.discard_restored(restored)
        q.release(flow)
        return _skip(cp.conn, str(exc))
    # debug: ten thousand of these cost about a second of JSON; the failover's timeline line
    # counts them, and every skipped connection has its own warning
    log.debug("connection_resurrected", conn=cp.conn, consumed=cp.inbound_consumed,
             produced=resume_produced, peer_holds=plan.peer_holds, unsent=len(plan.ici.unsent))
    return Resurrected(cp.conn, sock, cp, plan, cp.inbound_consumed, resume_produced)
