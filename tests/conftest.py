"""Shared pytest fixtures: the network-namespace lab and real Redis servers inside it.

`lab` is one lab per test module (built by ops/lab.py, always removed, even when tests fail);
`fresh_lab` is one lab per test for tests that break things (crash, partition, address moves).
`redis_factory(host, port=None, **conf)` starts a real redis-server in a lab host and stops it
when the test ends.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from ops import logs
from ops.lab import Lab
from ops.redislab import RedisServer

logs.configure(fmt=os.environ.get("TCPCP_LOG_FORMAT", "console"),
               level=os.environ.get("TCPCP_LOG_LEVEL", "warning"))


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
