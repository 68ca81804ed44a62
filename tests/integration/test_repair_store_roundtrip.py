"""A real connection with 4 MiB in its send queue goes through the checkpoint store: dumped on
origin, written to a real redis-server, read back and verified, restored on standby, and every
byte reaches the peer exactly once. The ICI is the one owner of the queue bytes."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from kernel import codec, repair
from kernel.sanity import RestorePolicy
from ops import gatelab
from ops.lab import Lab
from store.client import CheckpointStore
from store.config import StoreConfig
from store.limits import DEFAULT_LIMITS
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    keyring,
    redis_server,
)

pytestmark = pytest.mark.lab
PORT = 8700
QUEUED = 4 << 20


def counting(offset: int, n: int) -> bytes:
    """The counting stream: byte i of the stream is i mod 251."""
    start = offset % 251
    reps = (start + n) // 251 + 1
    return (bytes(range(251)) * reps)[start : start + n]


@pytest.fixture()
def on_origin(lab: Lab) -> Iterator[Lab]:
    lab.switch_route("origin")
    yield lab
    lab.heal()
    lab.switch_route("origin")


def test_four_mib_send_queue_goes_through_redis_and_reaches_the_peer_exactly_once(
    on_origin: Lab, redis_server: LocalRedis, keyring: KeyRing,  # noqa: F811
) -> None:
    lab = on_origin
    with lab.enter("origin"):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((lab.service(4), PORT))
        ls.listen()
    with lab.enter("peer"):
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it does not read
        peer.connect((lab.service(4), PORT))
    origin, _ = ls.accept()
    ls.close()
    origin.setsockopt(socket.SOL_SOCKET, repair.SO_SNDBUFFORCE, 8 << 20)  # the app's choice
    origin.setblocking(False)
    written = 0
    with contextlib.suppress(BlockingIOError):
        while written < QUEUED:
            written += origin.send(counting(written, QUEUED - written))
    assert written == QUEUED, "the send buffer took all of it"
    lab.partition("origin", ["peer"])  # until the switch: nothing reaches a socketless host
    ici = repair.dump(origin, stay_in_repair=True)
    repair.discard(origin)
    queue = ici.sent + ici.unsent
    assert QUEUED - (64 << 10) < len(queue) <= QUEUED
    assert queue == counting(QUEUED - len(queue), len(queue))

    raw = codec.encode(ici)
    assert len(raw) <= DEFAULT_LIMITS.max_ici
    conn = str(ici.identity)
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring) as store:
        epoch = store.lease_acquire("origin", "origin", ttl_ms=10_000)
        store.put(Checkpoint(origin="origin", conn=conn, epoch=epoch, version=1,
                             time_ns=time.time_ns(), inbound_consumed=0,
                             outbound_produced=QUEUED, ici=raw, app_state=b"",
                             send_queue=b""))  # the ICI holds the queue: not twice
        got = store.get("origin", conn)
    assert got is not None and got.send_queue == b"" and got.ici == raw
    back = codec.decode(got.ici)
    assert back == ici

    with lab.enter("standby"):
        restored = repair.restore(back, RestorePolicy.serving(lab.service(4)))
    lab.switch_route("standby")
    lab.heal()
    sock = repair.activate(restored)
    delivered = QUEUED - len(queue)
    assert gatelab.recv_exactly(peer, delivered, timeout=10) == counting(0, delivered)
    assert gatelab.recv_exactly(peer, len(queue), timeout=60) == counting(delivered, len(queue))
    peer.settimeout(0.3)
    with pytest.raises(TimeoutError):
        peer.recv(1)  # nothing more: no byte twice
    sock.close()
    peer.close()
