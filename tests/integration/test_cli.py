"""The operator's commands: `tcpcp lab ...` end to end, `--help` everywhere, placeholders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ops import netns

BIN = os.path.join(os.path.dirname(sys.executable), "")


def _tcpcp(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN + "tcpcp", "--log-format", "json", *args], capture_output=True,
                          text=True, check=check, timeout=120)


def test_lab_up_status_crash_heal_exec_down_from_the_command_line() -> None:
    prefix = f"tcli{os.getpid()}"
    try:
        up = _tcpcp("lab", "--prefix", prefix, "up", "--stores", "1")
        assert f"lab {prefix} is up" in up.stdout
        assert netns.exists(f"{prefix}-origin")
        status = json.loads(_tcpcp("lab", "--prefix", prefix, "status", "--json", "--reach").stdout)
        assert status["service"]["owner"] == "origin"
        assert all(v == "46" for row in status["reach"].values() for v in row.values())
        _tcpcp("lab", "--prefix", prefix, "crash", "origin")
        status = json.loads(_tcpcp("lab", "--prefix", prefix, "status", "--json", "--reach").stdout)
        assert status["cut"] == ["p-origin"]
        assert status["reach"]["peer"]["origin"] == "-"
        assert status["reach"]["peer"]["standby"] == "46"
        _tcpcp("lab", "--prefix", prefix, "heal")
        _tcpcp("lab", "--prefix", prefix, "switch", "standby")
        status = json.loads(_tcpcp("lab", "--prefix", prefix, "status", "--json").stdout)
        assert status["cut"] == [] and status["service"]["owner"] == "standby"
        ex = _tcpcp("lab", "--prefix", prefix, "exec", "standby", "--", "cat",
                    "/proc/net/if_inet6")
        assert "fd770009" in ex.stdout.replace(":", "")  # the service address moved in
    finally:
        _tcpcp("lab", "--prefix", prefix, "down", check=False)
    assert not netns.exists(f"{prefix}-origin")
    gone = _tcpcp("lab", "--prefix", prefix, "status", check=False)
    assert gone.returncode != 0 and "no lab with prefix" in gone.stderr


def test_every_command_explains_itself_with_help() -> None:
    for argv in (["tcpcp", "--help"], ["tcpcp", "lab", "--help"], ["tcpcp", "bench", "--help"],
                 ["checkpointer", "--help"], ["resurrector", "--help"]):
        r = subprocess.run([BIN + argv[0], *argv[1:]], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout and len(r.stdout) > 200


def test_the_daemons_without_configuration_name_what_they_need() -> None:
    env = {"PATH": os.environ["PATH"]}
    r = subprocess.run([BIN + "checkpointer"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("checkpointer: ") and "expected" in r.stderr
    r = subprocess.run([BIN + "resurrector"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert "resurrector: error: expected --keys, --origin, --serve" in r.stderr


def test_demo_runs_to_the_end() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    r = subprocess.run([sys.executable, "-m", "ops.demo", "--log-format", "json"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo OK" in r.stdout, r.stdout
    assert "FAIL" not in r.stdout and " 0 RST" in r.stdout and "1 connect, file intact" in r.stdout
