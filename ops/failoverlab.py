"""The standby side of a failover in the lab, as the crash tests and the demo set it up.

    side = StandbySide(lab, "standby", origin="web1", store_url=redis.url, keys=keys,
                       port=5501, workdir=tmp_path / "standby").start()
    ...                                   # crash the origin: side's resurrector takes it over
    side.timeline()                       # its failover_timeline line
    side.finished()                       # the adopting sink's "finished" lines

    ResurrectorProcess(lab, "standby", store_url=..., keys=..., origin="web1",
                       log=tmp_path / "resurrector.log", extra=[...]).start()  # one alone

On `host`: a standby checkpointer for `origin` (--standby, its own lease holder and bpffs), a
resurrector that claims the origin for that holder, gates what it restores (the gate the
checkpointer takes over) and moves the service to `host` (its addresses, announced; or the
gateway's route, through the lab's operator hook), and a sink that adopts what the resurrector
hands over and commits it through the standby checkpointer. So `host` survives a crash of its
own as the origin did: a fail back.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ops.agentlab import BIN, AgentProcess
from ops.lab import Lab
from ops.wait import wait_until


def events(path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of `path` whose event is `name`."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    out.append(doc)
    return out


class ResurrectorProcess:
    """One `resurrector` daemon in a lab host, started with --once (it lingers `linger_s` after
    its failover, so its hand-over sockets stay up), JSON logs in `log`, the lease polled
    every 20 ms and no metrics endpoint unless `extra` asks for one."""

    def __init__(self, lab: Lab, host: str, *, store_url: str, keys: Path, origin: str,
                 log: Path, serve: Sequence[str] | None = None, extra: Sequence[str] = (),
                 linger_s: float = 120.0, env: Mapping[str, str] | None = None) -> None:
        self.lab, self.host, self.log = lab, host, log
        self.argv = [str(BIN / "resurrector"), "--url", store_url, "--keys", str(keys),
                     "--origin", origin, "--once", "--log-format", "json", "--poll-ms", "20"]
        for address in serve if serve is not None else (lab.service(4), lab.service(6)):
            self.argv += ["--serve", address]
        if "--metrics-address" not in extra:
            self.argv += ["--metrics-address", ""]
        self.argv += list(extra)
        self.env = dict(os.environ, TCPCP_RESURRECTOR_LINGER_S=str(linger_s),
                        TCPCP_LOG_FORMAT="json", **(env or {}))

    def start(self, timeout: float = 60.0) -> ResurrectorProcess:
        with self.log.open("wb") as out:
            self.lab.popen(self.host, self.argv, stdout=out, stderr=subprocess.STDOUT,
                           env=self.env)
        wait_until(lambda: events(self.log, "resurrector_watching"), timeout,
                   what=f"the resurrector on {self.host} watching")
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        return events(self.log, name)

    def timeline(self) -> list[dict[str, Any]]:
        return events(self.log, "failover_timeline")


def switch_command(lab: Lab, host: str) -> str:
    """The lab's operator hook moving the service's route to `host` (--takeover-cmd)."""
    return f"{sys.executable} -m ops.cli lab --prefix {lab.prefix} switch {host}"


class StandbySide:
    """A standby checkpointer, a resurrector and an adopting sink on one lab host."""

    def __init__(self, lab: Lab, host: str, *, origin: str, store_url: str, keys: Path,
                 port: int, workdir: Path, ttl_ms: int = 1000, think_ms: float = 0.0,
                 takeover: str = "address") -> None:
        """takeover "address": the resurrector adds the service addresses and announces them
        (the lab must be in address mode: Lab.move_address); "route": it runs `tcpcp lab
        switch HOST` (a new Python process: seconds on a loaded machine)."""
        self.lab, self.host, self.origin = lab, host, origin
        self.takeover = takeover
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.holder = f"checkpointer@{origin}@{host}"
        self.agent = AgentProcess(lab, host, store_url=store_url, keys=keys, guard=[port],
                                  workdir=workdir, origin=origin, ttl_ms=ttl_ms, backend="bpf",
                                  extra=["--standby", "--lease-holder", self.holder])
        self.handover = self.agent.socket_path.parent / "handover.sock"
        self.store_url, self.keys, self.think_ms = store_url, keys, think_ms
        self.resurrector_log = workdir / "resurrector.log"
        self.sink_log = workdir / "adopter.log"

    def start(self) -> StandbySide:
        self.agent.start(ready_event="checkpointer_standby")
        how = ["--takeover", "address"] if self.takeover == "address" else \
            ["--takeover-cmd", switch_command(self.lab, self.host)]
        ResurrectorProcess(
            self.lab, self.host, store_url=self.store_url, keys=self.keys, origin=self.origin,
            log=self.resurrector_log, linger_s=300,
            env={"TCPCP_GATE_PIN_ROOT": str(self.agent.pin_root)},
            extra=["--claim-for", self.holder, "--gate-backend", "bpf", *how,
                   "--handover-socket", str(self.handover)]).start()
        with self.sink_log.open("wb") as out:
            self.lab.popen(self.host, [
                sys.executable, "-m", "ops.apps.sink", "--adopt", str(self.handover),
                "--checkpointer", str(self.agent.socket_path), "--think-ms", str(self.think_ms)],
                stdout=out, stderr=subprocess.STDOUT,
                env=dict(os.environ, TCPCP_LOG_FORMAT="json"))
        wait_until(lambda: events(self.sink_log, "adopting"), 30,
                   what=f"the adopting sink on {self.host}")
        return self

    def timeline(self) -> list[dict[str, Any]]:
        return events(self.resurrector_log, "failover_timeline")

    def finished(self) -> list[dict[str, Any]]:
        return events(self.sink_log, "finished")

    def close(self) -> None:
        self.agent.close()
