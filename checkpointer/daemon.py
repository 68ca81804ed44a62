"""The `checkpointer` daemon: its configuration turned into a running agent, and its shutdown.

    checkpointer --config /etc/tcpcp/checkpointer.toml      # or TCPCP_CHECKPOINTER_* / flags
    checkpointer --help                                     # every setting, explained

run(config) is the daemon; the command line (configuration errors, logging) is wired in
ops/daemons.py.

Start-up, in this order (a failure stops it with a message naming what was expected):
signing keys -> store (durability checked) -> the lease, acquired and held -> the ACK gate
(pinned under /sys/fs/bpf/tcpcp: a gate a killed agent left is taken over in one step, so its
flows are never ungated) -> metrics -> the local API socket.

The lease holder (lease.holder, default checkpointer@ORIGIN) is the same across restarts of the
agent, so a restarted agent takes its own lease back instead of waiting for it to expire.

A standby's checkpointer (`--standby --origin web1 --lease-holder checkpointer@web1@sb1`) runs
beside the resurrector of another host's origin. It waits, without limit, until that
resurrector claims the origin for its holder (resurrector --claim-for), then renews the lease and
guards the connections the standby application adopted, under the origin's name and the claimed
epoch, so that a second failure (or a fail back) is survived as the first was.

SIGTERM / SIGINT: stop taking requests, finish the commits queued, leave the gate attached and
pinned (no flow is ungated, no ACK released that was not committed), stop renewing the lease
without releasing it (the connections are still alive here: a standby must not take them
over), exit 0. SIGKILL leaves the same state behind; the next agent takes it over.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

from checkpointer import config as cfg
from checkpointer.agent import Agent, Settings
from checkpointer.fdpass import Guarded
from checkpointer.lease import LeaseState, LeaseTiming
from checkpointer.leaseloop import LeaseKeeper
from checkpointer.metrics import CheckpointerMetrics, Registry, serve
from kernel.gate import GATE_PIN_ROOT
from kernel.gatebackend import Gate, open_gate, socket_flow
from kernel.isolation import Isolation, flow_of
from kernel.patch_gate import Backend
from store.client import CheckpointStore
from store.errors import StoreError
from store.signing import load_keyring

log = structlog.get_logger(component="tcpcp.checkpointer.daemon")

class GateFreezer:
    """Self-fencing through the eBPF gate's freeze (egress of the flow dropped)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def freeze(self, conns: Sequence[socket.socket]) -> None:
        for s in conns:
            self.gate.bpf_gate.freeze(socket_flow(s))

    def thaw(self, conns: Sequence[socket.socket]) -> None:
        for s in conns:
            self.gate.bpf_gate.thaw(socket_flow(s))


class NftFreezer:
    """Self-fencing for the patch backend (which has no freeze): the flows' packets dropped
    by nftables at output and prerouting (kernel/isolation.py)."""

    def __init__(self) -> None:
        self.isolation = Isolation(table="tcpcp_fence")

    def freeze(self, conns: Sequence[socket.socket]) -> None:
        self.isolation.add([flow_of(s) for s in conns])

    def thaw(self, conns: Sequence[socket.socket]) -> None:
        self.isolation.remove([flow_of(s) for s in conns])


def run(config: cfg.Config, *, ready: threading.Event | None = None,
        stop: threading.Event | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT (or `stop`, for tests); the exit status."""
    stop = stop or threading.Event()
    dlog = log.bind(origin=config.origin)
    # one descriptor per guarded connection: take the hard limit, not the default 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    keys = load_keyring(config.keys_file)
    store = CheckpointStore.connect(cfg.store_with_password(config), keys)
    registry = Registry()
    metrics = CheckpointerMetrics.register(registry)
    backend = config.gate_backend.backend
    gate = open_gate(config.interfaces[0], backend=backend,
                     pin_root=Path(os.environ.get("TCPCP_GATE_PIN_ROOT") or GATE_PIN_ROOT))
    freezer = GateFreezer(gate) if gate.backend is Backend.BPF else NftFreezer()
    agent_box: list[Agent] = []

    def freeze_all() -> None:
        if agent_box:
            agent_box[0].freeze_all()

    def thaw_all() -> None:
        if agent_box:
            agent_box[0].thaw_all()

    keeper = LeaseKeeper(store, origin=config.origin, holder=config.lease_holder,
                         timing=LeaseTiming(config.lease_ttl_ms, config.lease_renew_ms),
                         freeze_all=freeze_all, thaw_all=thaw_all, metrics=metrics,
                         standby=config.standby)
    settings = Settings(
        origin=config.origin, socket_path=config.socket_path,
        guarded=Guarded.of(ports=[g.port for g in config.guarded_ports if g.address is None],
                           addresses=[(str(g.address), g.port) for g in config.guarded_ports
                                      if g.address is not None]),
        allowed_uids=config.allowed_uids, allowed_gids=config.allowed_gids,
        checkpoint_period_s=config.checkpoint_period_ms / 1000)
    open_states = (LeaseState.HELD, LeaseState.RENEW_FAILING)  # flows not frozen yet
    agent = Agent(store, gate, settings, metrics=metrics, freezer=freezer,
                  epoch=lambda: keeper.epoch, held=lambda: keeper.state in open_states)
    agent_box.append(agent)
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    metrics_server = None
    try:
        keeper.start()
        if config.standby:
            dlog.info("checkpointer_standby", holder=config.lease_holder,
                      waiting_for="the origin claimed for this holder")
            while not stop.is_set() and keeper.wait_for(
                    {LeaseState.HELD, LeaseState.TAKEN_OVER}, 1.0) is LeaseState.ACQUIRING:
                pass
            if stop.is_set():
                return 0
        if not keeper.wait_held(config.lease_ttl_ms / 1000 * 3):
            dlog.error("lease_not_acquired", state=keeper.state.value,
                       expected="the origin's lease held within 3 TTLs")
            return 1
        metrics_server = serve(registry, config.metrics_address)
        agent.start()
        dlog.info("checkpointer_ready", backend=gate.backend.value, epoch=keeper.epoch,
                  socket=str(config.socket_path), gate_reattached=gate.reattached,
                  metrics=metrics_server.url if metrics_server is not None else None)
        if ready is not None:
            ready.set()
        stop.wait()
        dlog.info("checkpointer_stopping")
        return 0
    except StoreError as exc:
        dlog.error("store_failed", error=str(exc))
        return 1
    finally:
        agent.stop()
        keeper.stop()
        if metrics_server is not None:
            metrics_server.close()
        gate.leave()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        dlog.info("checkpointer_stopped")
