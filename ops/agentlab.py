"""A checkpointer agent run as a real process inside a lab host, for tests, benchmarks and the
demo: its store, its signing keys, its socket, its pinned gate, and how to kill and restart it.

    keys = write_keys(tmp / "keys.json")
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[5001],
                         workdir=tmp).start()          # returns once the agent is ready
    with Checkpointer(agent.socket_path) as cp: ...
    agent.kill(); agent.start()                        # SIGKILL, then a new agent takes over
    agent.stop()                                       # SIGTERM, exit status 0 expected
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ops.lab import Lab
from ops.wait import wait_until

BIN = Path(sys.executable).parent


def write_keys(path: Path, key_id: str = "k1") -> Path:
    """A signing-key file (store/signing.py's JSON), readable by root only."""
    path.write_text(json.dumps({"sign_with": key_id, "keys": {key_id: secrets.token_hex(32)}}))
    path.chmod(0o600)
    return path


class AgentProcess:
    """One `checkpointer` daemon inside a lab host."""

    def __init__(self, lab: Lab, host: str, *, store_url: str, keys: Path, guard: Sequence[int],
                 workdir: Path, origin: str = "origin", backend: str = "auto",
                 ttl_ms: int = 2000, period_ms: int = 200, metrics_port: int | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.lab, self.host, self.origin, self.backend = lab, host, origin, backend
        self.workdir = workdir
        # in /run, not in workdir: a test's client of another uid must reach it (SO_PEERCRED
        # decides who may talk, not the directory)
        self.socket_path = Path("/run") / f"tcpcp-test-{os.getpid()}-{workdir.name}" / "agent.sock"
        self.log_path = workdir / "agent.log"
        # a private bpffs: a test's gate never meets another test's pinned maps, and the
        # host's /sys/fs/bpf (mounted or not) is left alone
        self.pin_root = workdir / "bpffs"
        self._mounted = False
        self.argv = [str(BIN / "checkpointer"), "--url", store_url, "--keys", str(keys),
                     "--origin", origin, "--socket-path", str(self.socket_path),
                     "--metrics-address", "" if metrics_port is None
                     else f"127.0.0.1:{metrics_port}",
                     "--interface", "eth0", "--gate-backend", backend,
                     "--lease-ttl-ms", str(ttl_ms), "--checkpoint-period-ms", str(period_ms),
                     "--log-format", "json", *extra]
        for port in guard:
            self.argv += ["--guard", str(port)]
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[Any] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0, ready_event: str = "checkpointer_ready"
              ) -> AgentProcess:
        """Start the daemon and wait until it logs `ready_event` (by default: ready, its socket
        answers; a standby's checkpointer says "checkpointer_standby" long before that)."""
        if not self._mounted and self.backend != "patch":  # the patch backend pins nothing
            self.pin_root.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "bpf", "bpf", str(self.pin_root)], check=True)
            self._mounted = True
        env = dict(os.environ, TCPCP_GATE_PIN_ROOT=str(self.pin_root))
        self._log = self.log_path.open("ab")
        self.proc = self.lab.popen(self.host, self.argv, stdout=self._log,
                                   stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        want = self.starts

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"checkpointer exited {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            return self.log_text().count(f'"{ready_event}"') >= want
        wait_until(ready, timeout, what="the checkpointer agent ready")
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, Any]]:
        """The agent's JSON log lines whose event is `name`."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    out.append(doc)
        return out

    def metrics(self) -> dict[str, float]:
        """The agent's Prometheus samples ("name{labels}" -> value), scraped inside its host."""
        assert self.metrics_port is not None, "started without metrics"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())
        samples = {}
        for line in self.lab.call(self.host, scrape).splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crash of the agent alone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return int(self.proc.returncode)

    def close(self) -> None:
        """Kill it if still running and unmount its bpffs (its pinned maps go with it; the
        filter dies with the lab's namespace)."""
        self.kill()
        if self._log is not None:
            self._log.close()
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.pin_root)], check=False)
            self._mounted = False
        # the whole directory: tests put their other sockets (the resurrector's hand-over)
        # beside the agent's, and a leftover directory per run piles up in /run
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
