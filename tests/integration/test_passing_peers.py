"""Passing driven the way users drive real clients: unpaced `wget --limit-rate` downloads,
`curl` request loops that open new connections during the passes, and full-speed `curl -T`
uploads, each with 10 passes at random moments, there and back. Clean means: the peer sees no
RST, every byte arrives once, no socket buffer ends up locked (autotuning stays on), and no
segment is dropped by PAWS."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.apps.demo_server import counting
from ops.capture import FIN, RST, Capture
from ops.demo import RECEIVE_PORT, SERVICE_PORT, demo_servers
from ops.lab import Lab
from ops.passcli import LabSwitch, pass_connections, request
from ops.wait import wait_until

pytestmark = pytest.mark.lab
ROUNDS = 10


@pytest.fixture(scope="module")
def servers(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with demo_servers(lab, tmp_path_factory.mktemp("peers"), log_level="info") as controls:
        yield controls
    lab.unswitch_flows()


def status(control: str) -> dict[str, Any]:
    return request(control, {"cmd": "status"})


@pytest.fixture(autouse=True)
def quiet_servers(servers: dict[str, str]) -> None:
    """Each test starts with no connection left on either server from an earlier one."""
    wait_until(lambda: all(status(servers[h])["conns"] == 0 for h in ("origin", "standby")),
               20, what="no connection left from an earlier test on origin and standby")


class Passer:
    """Passes every connection origin -> standby -> origin ... at random moments, in a thread,
    until stopped or ROUNDS passes are done; records every report."""

    def __init__(self, lab: Lab, servers: dict[str, str], seed: int,
                 gap_s: tuple[float, float] = (0.05, 0.4)) -> None:
        self.lab, self.servers, self.gap_s = lab, servers, gap_s
        self.rng = random.Random(seed)
        self.seed = seed
        self.reports: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="passer")

    def _run(self) -> None:
        try:
            where = "origin"
            for _ in range(ROUNDS):
                if self.stop.wait(self.rng.uniform(*self.gap_s)):
                    return
                dst = "standby" if where == "origin" else "origin"
                report = pass_connections(
                    self.servers[where], f"{self.lab.addr(dst, 4)}:{RECEIVE_PORT}", dst,
                    LabSwitch(self.lab, where, dst))
                self.reports.append(report)
                if report.get("event") != "passed":
                    return
                where = dst
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Passer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)

    def check(self, each_passes: int = 0) -> None:
        """Every pass clean, ROUNDS of them; with each_passes, every pass moved at least that
        many connections (the transfers lasted through all of them)."""
        assert not self.thread.is_alive()
        if self.error is not None:
            raise AssertionError(f"passer (seed {self.seed}) failed") from self.error
        bad = [r for r in self.reports if r.get("event") != "passed" or r.get("closed")]
        assert bad == [], f"seed {self.seed}: passes not clean: {bad}"
        assert len(self.reports) == ROUNDS, f"seed {self.seed}: {len(self.reports)} passes"
        assert sum(r["passed"] for r in self.reports) > 0
        moved = [r["passed"] for r in self.reports]
        assert min(moved) >= each_passes, (f"seed {self.seed}: connections per pass {moved}; "
                                           f"{[r['resumed'] for r in self.reports]}")


@pytest.fixture
def clean_peer(lab: Lab, servers: dict[str, str], tmp_path: Path) -> Iterator[Capture]:
    """A capture in the peer's namespace; afterwards: no RST before a FIN, no new PAWS drops
    of data, no locked socket buffer on either server."""
    def paws() -> dict[str, int]:
        out = lab.run("peer", ["nstat", "-azs", "--json"], capture_output=True, text=True,
                      check=True).stdout
        kernel = json.loads(out)["kernel"]
        return {k: int(v) for k, v in kernel.items() if "PAWS" in k and k != "TcpExtPAWSOldAck"}

    before = paws()
    cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {SERVICE_PORT}", snaplen=96,
                         path=tmp_path / "peer.pcap")
    with cap:
        yield cap
    fin_at: dict[int, float] = {}
    for s in cap.segments():
        port = s.dport if s.sport == SERVICE_PORT else s.sport
        if s.flags & FIN:
            fin_at.setdefault(port, s.at)
    resets = [s for s in cap.segments() if s.flags & RST
              and s.at < fin_at.get(s.dport if s.sport == SERVICE_PORT else s.sport, 1e99)]
    assert resets == [], f"the peer saw {len(resets)} RST on open connections: {resets[:3]}"
    assert paws() == before
    for host in ("origin", "standby"):
        st = status(servers[host])
        assert st["buffers_locked"] == 0, f"{host}: passes locked socket buffers: {st}"
        assert st["errors"] == 0, f"{host}: stream errors {st}"


def test_unpaced_wget_downloads_with_a_rate_limit_survive_ten_passes(
    lab: Lab, servers: dict[str, str], clean_peer: Capture, tmp_path: Path,
) -> None:
    size, n = 10_000_000, 4
    wgets = [lab.popen("peer", ["wget", "-q", "--limit-rate=1500k", "-O",
                                str(tmp_path / f"w{i}"),
                                f"http://{lab.service(4)}:{SERVICE_PORT}/{size}"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n)]
    wait_until(lambda: status(servers["origin"])["kinds"].get("http") == n, 10,
               what="every wget's request on origin")
    with Passer(lab, servers, seed=random.randrange(1 << 30)) as passer:
        passer.thread.join(120)
    passer.check(each_passes=n)
    for i, w in enumerate(wgets):
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, f"wget {i}: exit {w.returncode}: {err!r}"
        assert (tmp_path / f"w{i}").read_bytes() == counting(0, size), f"wget {i}: damaged"


def test_curl_request_loops_opening_connections_during_passes_all_succeed(
    lab: Lab, servers: dict[str, str], clean_peer: Capture,
) -> None:
    """Four loops of paced 200 kB requests (0.2 s each): passes catch requests in flight while
    new connections keep arriving on origin."""
    url = f"http://{lab.service(4)}:{SERVICE_PORT}/200000/1000000"
    loops = [lab.popen("peer", [
        "sh", "-c", f"for i in $(seq 50); do curl -sS -o /dev/null -w '%{{http_code}} "
        f"%{{size_download}} %{{num_connects}}\\n' {url} 2>&1; done"],
        stdout=subprocess.PIPE, text=True) for _ in range(4)]
    wait_until(lambda: status(servers["origin"])["kinds"].get("http"), 10,
               what="the first requests on origin")
    with Passer(lab, servers, seed=random.randrange(1 << 30)) as passer:
        passer.thread.join(120)
    lines = [line for loop in loops for line in loop.communicate(timeout=120)[0].splitlines()]
    passer.check()
    assert len(lines) == 200
    bad = [line for line in lines if line != "200 200000 1"]
    assert bad == [], f"{len(bad)} of 200 requests failed: {bad[:5]}"


def test_full_speed_uploads_survive_ten_passes(
    lab: Lab, servers: dict[str, str], clean_peer: Capture, tmp_path: Path,
) -> None:
    size, n = 400_000_000, 2
    src = tmp_path / "upload"
    with src.open("wb") as f:
        for at in range(0, size, 1 << 24):
            f.write(counting(at, min(1 << 24, size - at)))
    curls = [lab.popen("peer", ["curl", "-sS", "-H", "Expect:", "-T", str(src),
                                f"http://{lab.service(4)}:{SERVICE_PORT}/up{i}"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    wait_until(lambda: status(servers["origin"])["kinds"].get("upload") == n, 10,
               what="both uploads on origin")
    with Passer(lab, servers, seed=random.randrange(1 << 30), gap_s=(0.01, 0.1)) as passer:
        passer.thread.join(120)
    passer.check(each_passes=n)
    for i, c in enumerate(curls):
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0, f"upload {i}: exit {c.returncode}: {err}"
        assert out.strip() == f"{size} 0", f"upload {i}: the server got {out!r}"
