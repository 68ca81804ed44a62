"""The two daemons' command lines: configuration errors reported, logs configured (ops/logs.py),
SIGTERM/SIGINT turned into a clean stop. The daemons themselves are checkpointer/daemon.py and
resurrector/daemon.py; `checkpointer` and `resurrector` (pyproject's scripts) land here."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence

import structlog

from checkpointer import config as checkpointer_config
from checkpointer import daemon as checkpointer_daemon
from checkpointer.metrics import Registry, serve
from ops import logs
from resurrector import daemon as resurrector_daemon
from store.errors import StoreError

log = structlog.get_logger(component="tcpcp.ops.daemons")


def checkpointer(argv: Sequence[str] | None = None) -> int:
    try:
        config = checkpointer_config.load_config(argv, os.environ)
    except checkpointer_config.ConfigError as exc:
        print(f"checkpointer: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, config.log_level)
    try:
        return checkpointer_daemon.run(config)
    except (OSError, StoreError) as exc:
        log.error("checkpointer_failed", error=str(exc))
        return 1


class ResurrectorMetrics:
    """The resurrector's Prometheus metrics (resurrector.daemon.Observer), on the checkpointer's
    registry: the resurrector may not import the checkpointer, this outer ring may."""

    def __init__(self, registry: Registry) -> None:
        self.expired = registry.counter(
            "tcpcp_resurrector_leases_expired_total", "origin leases seen expired",
            ["origin"])
        self.failovers = registry.counter(
            "tcpcp_resurrector_failovers_total", "failovers by outcome (taken_over, "
            "stood_down: another resurrector won the claim, failed)", ["origin", "outcome"])
        self.connections = registry.counter(
            "tcpcp_resurrector_connections_total", "connections by outcome (resurrected, or "
            "skipped: refused, no_answer, unrouted, restore_failed)", ["origin", "outcome"])
        self.step = registry.gauge(
            "tcpcp_resurrector_last_failover_step_seconds", "the last failover's timeline: "
            "seconds from the lease seen expired to each step (claimed, quarantined, "
            "traffic_moved, probed, restored, handed)", ["origin", "step"])

    def lease_expired(self, origin: str) -> None:
        self.expired.labels(origin=origin).inc()

    def failover(self, origin: str, outcome: str, timeline_ms: Mapping[str, float],
                 resurrected: int, skipped: Sequence[tuple[str, str]]) -> None:
        self.failovers.labels(origin=origin, outcome=outcome).inc()
        self.connections.labels(origin=origin, outcome="resurrected").inc(resurrected)
        for _, reason in skipped:
            self.connections.labels(origin=origin,
                                    outcome=resurrector_daemon.skip_kind(reason)).inc()
        for step, ms in timeline_ms.items():
            self.step.labels(origin=origin, step=step).set(ms / 1000)


def resurrector(argv: Sequence[str] | None = None) -> int:
    args = resurrector_daemon.load(argv, os.environ)
    logs.configure(args.log_format, args.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    registry = Registry()
    metrics = ResurrectorMetrics(registry)
    server = None
    try:
        try:
            server = serve(registry, args.metrics)
        except OSError as exc:  # a standby must watch even when its metrics cannot be served
            log.error("metrics_unavailable", address=args.metrics_address, error=str(exc))
        return resurrector_daemon.run(args, stop, metrics)
    except (OSError, StoreError) as exc:
        log.error("resurrector_failed", error=str(exc))
        return 1
    finally:
        if server is not None:
            server.close()
