"""Shared pytest fixtures: the network-namespace lab and real Redis servers inside it.

`lab` is one lab per test module (built by ops/lab.py, always removed, even when tests fail);
`fresh_lab` is one lab per test for tests that break things (crash, partition, address moves).
`redis_factory(host, port=None, **conf)` starts a real redis-server in a lab host and stops it
when the test ends.

A test that takes a `gate_backend` argument runs once per ACK-gate backend the running kernel
has: `bpf` everywhere, `patch` too on a kernel with the tcpcp series (the patched guest).
TCPCP_GATE_BACKENDS (comma-separated) narrows that list; naming a backend this kernel lacks
fails the collection instead of skipping.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from kernel.patch_gate import Backend, commit_option_present
from ops import logs
from ops.kernel import build as kernel_build
from ops.lab import Lab
from ops.redislab import RedisServer

logs.configure(fmt=os.environ.get("TCPCP_LOG_FORMAT", "console"),
               level=os.environ.get("TCPCP_LOG_LEVEL", "warning"))


def gate_backends(requested: str | None, option_present: bool) -> list[str]:
    """The gate backends a test runs against: those this kernel has, narrowed to requested."""
    have = [Backend.BPF.value] + ([Backend.PATCH.value] if option_present else [])
    if not requested:
        return have
    wanted = [name.strip() for name in requested.split(",") if name.strip()]
    missing = [name for name in wanted if name not in have]
    if missing or not wanted:
        raise pytest.UsageError(f"expected TCPCP_GATE_BACKENDS to name backends of {have}, "
                                f"got {requested!r}")
    return wanted


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "gate_backend" in metafunc.fixturenames:
        metafunc.parametrize("gate_backend", gate_backends(
            os.environ.get("TCPCP_GATE_BACKENDS"), commit_option_present()))


# Modules that boot the guest kernels (ops/kernel/qemu.py). They run last; when the session
# also runs other tests, both kernels are built in the background meanwhile, at the lowest
# priority (TCPCP_KERNEL_PREBUILD=0 turns that off), and their build() waits for it.
GUEST_MODULES = frozenset({"test_kernel_guest.py", "test_bench_ackgate_backend.py"})
_background: list[subprocess.Popen[bytes]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    guest = [item for item in items if item.path.name in GUEST_MODULES]
    if not guest:
        return
    items[:] = [item for item in items if item.path.name not in GUEST_MODULES] + guest
    if (len(items) > len(guest) and os.geteuid() == 0 and not config.option.collectonly
            and os.environ.get("TCPCP_KERNEL_PREBUILD", "1") != "0"):
        _background.append(kernel_build.start_background("both"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for proc in _background:
        kernel_build.stop_background(proc)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (network namespaces, BPF, TCP_REPAIR): run ops/test")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    _need_root()
    with Lab(stores=3) as the_lab:
        yield the_lab


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    _need_root()
    with Lab(stores=3) as the_lab:
        yield the_lab


_ports = itertools.count(6400)


@pytest.fixture
def redis_factory(lab: Lab) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(host: str = "store", port: int | None = None, replicaof: RedisServer | None = None,
              **conf: str) -> RedisServer:
        srv = RedisServer(lab, host, port or next(_ports),
                          conf={k.replace("_", "-"): v for k, v in conf.items()},
                          replicaof=replicaof)
        started.append(srv)
        return srv.start()

    yield start
    for srv in reversed(started):
        srv.stop()
