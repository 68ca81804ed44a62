"""Network-namespace mechanics for the lab: enter a namespace from a thread, run processes in
one, find and kill every process living in one, create and remove namespaces.

Namespaces are the named ones under /var/run/netns (as `ip netns` makes them), created and
removed with pyroute2. A thread enters a namespace with setns(2) (kernel/netns.py); sockets it
creates there stay there. Processes are started through `nsenter --net=PATH` (util-linux),
which execs the command in place, so the child's pid is the command's pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from pyroute2 import netns as _netns

from kernel.netns import NETNS_DIR, entered, path, setns


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def listing() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create the named namespace; an existing one of that name is an error."""
    if exists(name):
        raise FileExistsError(f"network namespace {name} already exists")
    _netns.create(name)


def remove(name: str) -> None:
    """Kill every process in the namespace, then unmount and delete its name."""
    if not exists(name):
        return
    kill_all(name)
    with contextlib.suppress(FileNotFoundError):
        _netns.remove(name)


def inode(name: str) -> int:
    return os.stat(path(name)).st_ino


def pids(name: str) -> list[int]:
    """Every process whose network namespace is `name` (threads of other processes excluded)."""
    try:
        ino = inode(name)
    except FileNotFoundError:
        return []
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                found.append(int(entry))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def kill_all(name: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in the namespace and wait until they are gone (dead or zombie).

    It never reaps them: a zombie's exit status belongs to its parent (a Popen of this process
    that reaps it in wait(); reaped here, that wait() would report 0 instead of -SIGKILL)."""
    victims = pids(name)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.01)
    return victims


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def command(name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `name`."""
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(command(name, argv), **kwargs)


def run(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(command(name, argv), **kwargs)


def sysctl_write(name: str, key: str, value: str) -> None:
    """Write net.* sysctl `key` inside namespace `name` (per-thread /proc/sys view)."""
    with entered(name), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(str(value))


def sysctl_read(name: str, key: str) -> str:
    with entered(name), open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (to tell a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def join(ns_path: str) -> None:
    """Move the calling thread into the namespace at `ns_path` for good (thread initialiser)."""
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


class OutsideLabError(RuntimeError):
    """Lab traffic was about to leave from the machine's own namespace."""


def assert_inside_lab() -> None:
    """Refuse to go on in the machine's root namespace: lab addresses must never be sent to
    from there (they would leave the machine). Call before connecting to a lab address."""
    here = os.stat("/proc/thread-self/ns/net").st_ino
    named = set()
    for name in listing():
        with contextlib.suppress(OSError):
            named.add(os.stat(path(name)).st_ino)
    if here not in named:
        raise OutsideLabError(
            "expected to run inside a lab host (use lab.call/lab.enter), but this thread is in "
            "no named network namespace (the machine's own, probably)")


def steer_flows(name: str, interfaces: Sequence[str]) -> None:
    """Turn RPS on for `interfaces` in namespace `name`, over every CPU.

    A veth pair delivers a packet on the CPU that sent it, so two segments of one flow sent
    from two CPUs (the kernel's ACK from a softirq, a forced ACK from a thread) can overtake
    each other: a reordering no real NIC with receive-side scaling does. RPS hashes each flow
    to one CPU and keeps it in order. /sys shows the namespace's devices only when mounted from
    inside it, hence the private mount namespace of the child."""
    mask = format((1 << (os.cpu_count() or 1)) - 1, "x")
    script = " ; ".join(
        f"for q in /sys/class/net/{ifname}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
        for ifname in interfaces)
    run(name, ["unshare", "--mount", "sh", "-ec",
               f"mount -t sysfs sysfs /sys; {script}"], check=True, capture_output=True)
