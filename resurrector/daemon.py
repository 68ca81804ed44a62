"""The `resurrector` daemon: on a standby host, watches origins' leases and, when one expires,
resurrects the origin's connections here and hands them to the standby application.

    resurrector --url redis://store:6379 --keys keys.json --origin web1 --serve 10.0.0.80 \\
                --takeover-cmd "switch-traffic web1"          # or --takeover address
    resurrector --config /etc/tcpcp/resurrector.toml             # the same keys, in TOML
    TCPCP_RESURRECTOR_ORIGIN=web1,web2 resurrector ...            # or in the environment

Precedence: flags > environment (TCPCP_RESURRECTOR_<SETTING>, lists comma-separated) > the TOML
file (--config or TCPCP_RESURRECTOR_CONFIG; keys as the flags' names with underscores) >
defaults.

One failover, for an origin whose lease is seen expired (`lease_ms_left` None while an owner is
recorded):
  claim      store.claim with the epoch seen: the epoch goes up, every later write of the dead
             origin is refused; of several resurrectors exactly one wins, the others stand down;
  read       its records, each verified (signature, origin, sanity); a refused one is skipped
             with its reason;
  resurrect  quarantine, take the traffic over, probe, plan, restore, activate
             (resurrector/resurrect.py);
  hand over  each connection to the standby application (resurrector/handover.py), on the
             socket routed to its local port (--handover-socket 8080=/run/files.sock; a bare
             path takes the other ports; a connection with no socket is not restored);
and a timeline line (ms since the expiry was seen: claimed, quarantined, traffic_moved, probed,
restored, handed). The claimed lease is renewed from then on (until the standby's checkpointer
takes the connections over), so no other resurrector claims it again.

load() and run() are the daemon; the command line (logging, signals) is wired in
ops/daemons.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import socket
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from kernel.gate import GATE_PIN_ROOT
from kernel.gatebackend import Gate, open_gate
from kernel.quarantine import Quarantine
from kernel.sanity import Ecn, RestorePolicy
from resurrector.handover import Handed, HandoverServer
from resurrector.listenfds import spawn
from resurrector.planner import Output
from resurrector.resurrect import Resurrected, Skipped, resurrect
from resurrector.takeover import AddressTakeover, CommandTakeover, TakeoverError
from store.client import CheckpointStore
from store.cliopts import add_store_arguments, config_from_args
from store.errors import ClaimLost, LeaseHeld, StoreError
from store.record import Checkpoint
from store.signing import load_keyring

log = structlog.get_logger(component="tcpcp.resurrector.daemon")

ENV = "TCPCP_RESURRECTOR_"
PURPOSE = ("tcpcp resurrector: on a standby host, watches the origins' leases; when one "
           "expires, fences the origin (epoch bump), takes over its traffic, restores every "
           "connection from its last checkpoint and hands them to the standby application.")
_LISTS = {"origin", "serve", "allow_uid", "handover_socket"}
DEFAULT_HANDOVER = "/run/tcpcp/handover.sock"


@dataclass(frozen=True, slots=True)
class HandoverRoutes:
    """Which hand-over socket a connection goes to, by its local port. Pure."""

    by_port: Mapping[int, Path]
    default: Path | None

    @classmethod
    def parse(cls, items: Sequence[str]) -> HandoverRoutes:
        """From --handover-socket values ("PORT=PATH" or "PATH"); ValueError names the bad one."""
        by_port: dict[int, Path] = {}
        default: Path | None = None
        for item in items or [DEFAULT_HANDOVER]:
            port_text, sep, path_text = item.partition("=")
            if not sep:
                port_text, path_text = "", item
            path = Path(path_text)
            if not path.is_absolute():
                raise ValueError(f"--handover-socket {item!r}: expected an absolute path")
            if not port_text:
                if default is not None:
                    raise ValueError(f"--handover-socket {item!r}: expected one bare PATH at "
                                     f"most, got {default} too")
                default = path
                continue
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"--handover-socket {item!r}: expected PORT=PATH with a port "
                                 "in 1..65535")
            if int(port_text) in by_port:
                raise ValueError(f"--handover-socket {item!r}: port {port_text} routed twice")
            by_port[int(port_text)] = path
        return cls(by_port, default)

    def path_for(self, conn: str) -> Path | None:
        """The socket for a connection named "LOCAL>PEER" (kernel.ici.Identity's form)."""
        local = conn.partition(">")[0]
        port = local.rpartition(":")[2]
        return self.by_port.get(int(port), self.default) if port.isdigit() else self.default

    @property
    def paths(self) -> list[Path]:
        return sorted({*self.by_port.values(), *([self.default] if self.default else [])})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resurrector", description=PURPOSE)
    p.add_argument("--config", type=Path, help="TOML file with any of the settings below "
                   f"(keys: the flags' names with underscores; env {ENV}CONFIG)")
    add_store_arguments(p)
    p.add_argument("--origin", action="append", default=None,
                   help="an origin to watch (repeat for several; required)")
    p.add_argument("--name", default=None, help="this resurrector's holder name in the store "
                   "(default resurrector@<host name>)")
    p.add_argument("--claim-for", default=None, metavar="HOLDER",
                   help="claim the origin for this holder instead of --name: the lease.holder "
                   "of this host's standby checkpointer (checkpointer --standby), which then "
                   "keeps the lease and re-guards the adopted connections, so a second "
                   "failure is survived too")
    p.add_argument("--claim-hold-ms", type=int, default=30_000,
                   help="with --claim-for: renew the claimed lease this long after the "
                   "hand-over, for the standby checkpointer to take it (default 30000)")
    p.add_argument("--gate-backend", choices=("off", "auto", "bpf", "patch"), default=None,
                   help="put every restored connection under this host's ACK gate at its "
                   "committed sequence before activation (the gate the standby checkpointer "
                   "takes over; pinned under TCPCP_GATE_PIN_ROOT or /sys/fs/bpf/tcpcp). "
                   "Default: auto with --claim-for, else off (with nobody to commit, a gated "
                   "connection would stall)")
    p.add_argument("--ecn", choices=("refuse", "downgrade"), default="refuse",
                   help="a connection that negotiated ECN, where this kernel cannot restore ECN "
                   "(every stock kernel; kernel/patches/0005 can): refuse it (the default: "
                   "the peer would stop reacting to congestion marks) or restore it without "
                   "ECN")
    p.add_argument("--interface", default="eth0", help="where the quarantine and the probes "
                   "go (default eth0)")
    p.add_argument("--serve", action="append", default=None, metavar="ADDRESS",
                   help="a service address this standby may restore connections on (repeat; "
                   "required: a record for any other address is refused)")
    p.add_argument("--takeover", choices=("address", "command"), default=None,
                   help="how the traffic moves here: add the --serve addresses and announce "
                   "them (address, the default without --takeover-cmd) or run --takeover-cmd")
    p.add_argument("--takeover-cmd", default=None, metavar="CMD",
                   help="operator hook moving the traffic (route switch, per-flow rules); "
                   "gets {origin, flows} as JSON on stdin, must exit 0")
    p.add_argument("--handover-socket", action="append", default=None,
                   metavar="[PORT=]PATH",
                   help="unix socket the standby application adopts connections on; PORT=PATH "
                   "hands the connections of that local port to their own application (repeat "
                   "per application); a bare PATH takes every other port (default "
                   f"{DEFAULT_HANDOVER}). A connection whose port has no socket is not "
                   "restored")
    p.add_argument("--exec", default=None, metavar="CMD",
                   help="instead of the hand-over sockets: start CMD after each failover with "
                   "the resurrected connections as inherited descriptors (the systemd "
                   "LISTEN_FDS convention; positions and states on TCPCP_HANDOVER_FD; "
                   "resurrector.adopt.inherited() reads them)")
    p.add_argument("--allow-uid", type=int, action="append", default=None,
                   help="uids allowed to adopt connections (SO_PEERCRED; default 0)")
    p.add_argument("--poll-ms", type=int, default=100, help="how often leases are read "
                   "(default 100)")
    p.add_argument("--claim-ttl-ms", type=int, default=3000, help="the lease TTL this "
                   "resurrector holds a claimed origin with (default 3000)")
    p.add_argument("--probe-timeout-ms", type=int, default=300,
                   help="wait for a peer's answer this long per probe, 3 probes (default 300)")
    p.add_argument("--metrics-address", default="127.0.0.1:9478", metavar="HOST:PORT",
                   help='Prometheus endpoint (GET /metrics): failovers, connections resurrected '
                   'and skipped by reason, the last failover\'s timeline; "" disables it '
                   "(default 127.0.0.1:9478)")
    p.add_argument("--once", action="store_true",
                   help="exit after the first failover (tests, runbooks)")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info")
    return p


def load(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags over environment over TOML over defaults (see the module docstring)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    path = first.config or (Path(environ[ENV + "CONFIG"]) if ENV + "CONFIG" in environ
                            else None)
    defaults: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--config {path}: expected a readable TOML file, got {exc}")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(doc) - known)
        if unknown:
            parser.error(f"--config {path}: unknown settings {unknown} (expected some of "
                         f"{sorted(known - {'help', 'config'})})")
        defaults.update(doc)
    for action in parser._actions:
        raw = environ.get(ENV + action.dest.upper())
        if raw is None or action.dest in ("help", "config"):
            continue
        if action.dest in _LISTS:
            items = [x.strip() for x in raw.split(",") if x.strip()]
            convert = action.type if callable(action.type) else str
            defaults[action.dest] = [convert(x) for x in items]
        elif isinstance(action, argparse._StoreTrueAction):
            defaults[action.dest] = raw.lower() in ("1", "true", "yes", "on")
        else:
            defaults[action.dest] = action.type(raw) if callable(action.type) else raw
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    missing = [name for name in ("keys", "origin", "serve") if not getattr(args, name)]
    if missing:
        parser.error(f"expected {', '.join('--' + m for m in missing)} (flag, "
                     f"{ENV}<NAME> or the TOML file), got none")
    try:
        args.handover = HandoverRoutes.parse(args.handover_socket or [])
    except ValueError as exc:
        parser.error(str(exc))
    args.metrics = None
    if args.metrics_address:
        host, _, port = args.metrics_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--metrics-address {args.metrics_address!r}: expected HOST:PORT "
                         'or "" (disabled)')
        args.metrics = (host.strip("[]"), int(port))
    if args.gate_backend is None:
        args.gate_backend = "auto" if args.claim_for else "off"
    if (args.takeover or ("command" if args.takeover_cmd else "address")) == "command" \
            and not args.takeover_cmd:
        parser.error("--takeover command: expected --takeover-cmd CMD, got none")
    return args


class Observer(Protocol):
    """Who hears about failovers (metrics: the CLI wiring in ops/daemons.py gives one)."""

    def lease_expired(self, origin: str) -> None: ...

    def failover(self, origin: str, outcome: str, timeline_ms: Mapping[str, float],
                 resurrected: int, skipped: Sequence[tuple[str, str]]) -> None: ...


class _Unobserved:
    def lease_expired(self, origin: str) -> None:
        pass

    def failover(self, origin: str, outcome: str, timeline_ms: Mapping[str, float],
                 resurrected: int, skipped: Sequence[tuple[str, str]]) -> None:
        pass


def skip_kind(reason: str) -> str:
    """A skipped connection's reason as a metric label (the log line keeps the whole text)."""
    for prefix, kind in (("refused", "refused"), ("no answer", "no_answer"),
                         ("no hand-over socket", "unrouted")):
        if reason.startswith(prefix):
            return kind
    return "restore_failed"


class Renewer:
    """Keeps a claimed origin's lease (until stopped, or until hold_until, time.monotonic(),
    once set: the standby checkpointer renews it from then on)."""

    def __init__(self, store: CheckpointStore, origin: str, holder: str, epoch: int,
                 ttl_ms: int) -> None:
        self.args = (origin, holder, epoch, ttl_ms)
        self.store = store
        self.stop = threading.Event()
        self.hold_until: float | None = None
        threading.Thread(target=self._run, daemon=True, name=f"renew-{origin}").start()

    def _run(self) -> None:
        while not self.stop.wait(self.args[3] / 3000):
            if self.hold_until is not None and time.monotonic() > self.hold_until:
                log.info("claimed_lease_left_to_checkpointer", origin=self.args[0],
                         holder=self.args[1])
                return
            try:
                self.store.lease_renew(*self.args)
            except StoreError as exc:
                log.error("claimed_lease_not_renewed", origin=self.args[0], error=str(exc))


def _expired(store: CheckpointStore, origin: str) -> int | None:
    """The epoch seen when origin's lease is expired (an owner, no live lease), else None."""
    st = store.state(origin)
    if st.owner is not None and st.lease_ms_left is None:
        return st.epoch
    return None


def _strategy(args: argparse.Namespace) -> AddressTakeover | CommandTakeover:
    if args.takeover_cmd and args.takeover != "address":
        return CommandTakeover(args.takeover_cmd)
    return AddressTakeover(args.interface, args.serve)


def failover(args: argparse.Namespace, store: CheckpointStore,
             handovers: Mapping[Path, HandoverServer],
             holder: str, origin: str, seen: int, t0: float,
             gate: Gate | None = None, quarantine: Quarantine | None = None,
             observer: Observer | None = None, takeover: Any = None) -> list[Any]:
    """One failover of origin (the expiry seen at t0, time.monotonic())."""
    marks: dict[str, float] = {}
    flog = log.bind(origin=origin)

    def mark(step: str) -> None:
        marks[step] = round((time.monotonic() - t0) * 1000, 1)
    try:
        epoch = store.claim(origin, holder, seen, args.claim_ttl_ms)
    except (ClaimLost, LeaseHeld) as exc:
        flog.info("standing_down", reason=str(exc))
        (observer or _Unobserved()).failover(origin, "stood_down", {}, 0, ())
        return []
    mark("claimed")
    renewer = Renewer(store, origin, holder, epoch, args.claim_ttl_ms)
    checkpoints: list[Checkpoint] = []
    for read in store.records(origin, count=1000):
        if read.checkpoint is None:
            flog.warning("record_refused", conn=read.conn, reason=str(read.error))
        else:
            checkpoints.append(read.checkpoint)
    unrouted: list[Skipped] = []
    for cp in [cp for cp in checkpoints
               if not args.exec and args.handover.path_for(cp.conn) is None]:
        checkpoints.remove(cp)  # restored, it would have nowhere to go: leave it alone
        unrouted.append(Skipped(cp.conn, "no hand-over socket serves its port (expected a "
                                "--handover-socket PORT=PATH or a bare PATH)"))
        flog.warning("connection_unrouted", conn=cp.conn, reason=unrouted[-1].reason)
    logged = store.logged_connections(origin)
    flows = [cp.conn for cp in checkpoints]
    strategy = takeover or _strategy(args)
    results = resurrect(
        checkpoints, ifname=args.interface,
        policy=replace(RestorePolicy.serving(*args.serve), ecn=Ecn(args.ecn)),
        take_over=lambda: strategy(origin, flows),
        outputs=lambda cp: Output.LOGGED if cp.conn in logged else Output.REGENERABLE,
        output_log=lambda cp, pos: store.read_output(origin, cp.conn, pos),
        probe_timeout_s=args.probe_timeout_ms / 1000, timeline=mark, gate=gate,
        quarantine=quarantine)
    handed = [(Handed(r.conn, origin, epoch, r.resume_consumed, r.resume_produced,
                      r.plan.peer_ahead, "logged" if r.conn in logged else "regenerable",
                      r.checkpoint.app_state), r.sock)
              for r in results if isinstance(r, Resurrected)]
    if args.exec:
        child = spawn(shlex.split(args.exec), handed)
        flog.info("application_started", pid=child.pid, command=args.exec,
                  connections=len(handed))
        for _, sock in handed:
            sock.close()  # the application's now
    else:
        for h, sock in handed:
            handovers[args.handover.path_for(h.conn)].offer(h, sock)
    results = [*results, *unrouted]
    mark("handed")
    if args.claim_for:
        renewer.hold_until = time.monotonic() + args.claim_hold_ms / 1000
    done = sum(isinstance(r, Resurrected) for r in results)
    skipped = [(r.conn, r.reason) for r in results if isinstance(r, Skipped)]
    flog.info("failover_timeline", epoch=epoch, resurrected=done, skipped=skipped,
              **{f"{k}_ms": v for k, v in marks.items()})
    (observer or _Unobserved()).failover(origin, "taken_over", marks, done, skipped)
    return results


def run(args: argparse.Namespace, stop: threading.Event,
        observer: Observer | None = None) -> int:
    holder = args.claim_for or args.name or f"resurrector@{socket.gethostname()}"
    # 10,000 restored connections are as many descriptors: take the hard limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.ExitStack() as stack:
        store = CheckpointStore.connect(config_from_args(args), load_keyring(args.keys))
        stack.callback(store.close)
        gate = None
        if args.gate_backend != "off":
            # pinned where the standby checkpointer pins it: it takes these flows over as
            # they are; left attached on the way out (the flows stay gated at their commits)
            gate = open_gate(args.interface,
                             backend=None if args.gate_backend == "auto" else args.gate_backend,
                             pin_root=Path(os.environ.get("TCPCP_GATE_PIN_ROOT")
                                           or GATE_PIN_ROOT))
            stack.callback(gate.leave)
        # attached while watching, empty (every packet passes): a failover then only lists its
        # flows instead of loading and attaching the program (about 100 ms)
        quarantine = stack.enter_context(Quarantine(args.interface))
        takeover = _strategy(args)
        if isinstance(takeover, AddressTakeover):
            stack.callback(takeover.open().close)
        handovers = {path: HandoverServer(path, uids=args.allow_uid or [0]).start()
                     for path in args.handover.paths}
        for server in handovers.values():
            stack.callback(server.close)
        log.info("resurrector_watching", origins=args.origin, holder=holder,
                 handover=args.handover_socket or [DEFAULT_HANDOVER],
                 gate=None if gate is None else gate.backend.value)
        return _watch(args, stop, store, handovers, holder, gate, quarantine,
                      observer or _Unobserved(), takeover)


def _watch(args: argparse.Namespace, stop: threading.Event, store: CheckpointStore,
           handovers: Mapping[Path, HandoverServer], holder: str, gate: Gate | None,
           quarantine: Quarantine, observer: Observer,
           takeover: AddressTakeover | CommandTakeover) -> int:
    done: set[str] = set()
    while not stop.is_set():
        for origin in args.origin:
            if origin in done:
                continue
            try:
                seen = _expired(store, origin)
            except StoreError as exc:
                log.warning("lease_unreadable", origin=origin, error=str(exc))
                continue
            if seen is None:
                continue
            t0 = time.monotonic()
            log.info("lease_expired_seen", origin=origin, epoch=seen)
            observer.lease_expired(origin)
            try:
                failover(args, store, handovers, holder, origin, seen, t0, gate, quarantine,
                         observer, takeover)
            except (StoreError, TakeoverError) as exc:
                log.error("failover_failed", origin=origin, error=str(exc))
                observer.failover(origin, "failed", {}, 0, ())
            done.add(origin)
            if args.once:
                stop.wait(float(os.environ.get("TCPCP_RESURRECTOR_LINGER_S", "30")))
                return 0
        stop.wait(args.poll_ms / 1000)
    return 0
