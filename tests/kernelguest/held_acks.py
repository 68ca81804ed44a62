"""The ACK-gate scenario shared by the host lab test (bpf backend) and the guest test (patch
backend, and bpf in the same guest): a gated connection's bytes are read by the origin but the
peer sees them acknowledged only as far as the origin commits.

What the peer sees is read from its own socket (TCP_INFO bytes_acked, what `ss -tin` prints;
it counts the SYN, so a connection whose peer has sent n acknowledged bytes shows n + 1).
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable

from kernel.gatebackend import Gate
from kernel.repair import tcp_info
from kernel.seq import seq_add
from ops.gatelab import observe_for, recv_exactly
from ops.kernel.guestnet import VethPair, run_in
from ops.wait import wait_until

SENT = 8000     # below the ~14 KB a fresh connection has in flight: held bytes never stall it
FIRST = 3000    # the first commit
HOLD_S = 0.3    # longer than the delayed-ACK timer, shorter than the peer's first RTO (1 s)


class Guarding(enum.Enum):
    """How the connection becomes gated."""

    LISTEN = "listen"  # gate.guard_listen(listener) before the peer connects
    SOCKET = "socket"  # gate.guard(sock) on the accepted, established socket


def peer_bytes_acked(client: socket.socket) -> int:
    return int(tcp_info(client).tcpi_bytes_acked)


def _wait_acked(client: socket.socket, want: int, timeout: float = 10.0) -> None:
    wait_until(lambda: peer_bytes_acked(client) == want, timeout,
               what=f"the peer's bytes_acked at {want}")


def listen_and_connect(gate: Gate, guarding: Guarding,
                       listen: Callable[[], socket.socket],
                       connect: Callable[[], socket.socket]
                       ) -> tuple[socket.socket, socket.socket, int]:
    """(origin socket, peer socket, committed sequence at start) of a new gated connection.

    listen() makes the origin's listening socket, connect() the peer's connected socket (each
    inside its namespace)."""
    lst = listen()
    try:
        if guarding is Guarding.LISTEN:
            gate.guard_listen(lst)
        client = connect()
        lst.settimeout(10)
        server, _ = lst.accept()
    finally:
        lst.close()
    if guarding is Guarding.SOCKET:
        assert gate.committed_seq(server) is None, "a socket was gated before guard()"
        base = gate.guard(server)
    else:
        got = gate.committed_seq(server)
        assert got is not None, "guard_listen did not gate the accepted connection"
        base = got
    return server, client, base


def on_veth_pair(gate: Gate, guarding: Guarding, pair: VethPair, port: int
                 ) -> tuple[socket.socket, socket.socket, int]:
    """listen_and_connect over a guest veth pair: origin listens on its IPv4 address."""

    def listen() -> socket.socket:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((pair.origin_addr(4), port))
        lst.listen(4)
        return lst

    return listen_and_connect(
        gate, guarding, lambda: run_in(pair.origin_ns, listen),
        lambda: run_in(pair.peer_ns, lambda: socket.create_connection(
            (pair.origin_addr(4), port), 10)))


def check_acks_held_until_committed(gate: Gate, server: socket.socket, client: socket.socket,
                                    base: int) -> None:
    """The peer's bytes are read at once but acknowledged only up to each commit."""
    assert gate.committed_seq(server) == base
    assert peer_bytes_acked(client) == 1, "the peer had bytes acknowledged before sending"
    data = os.urandom(SENT)
    client.sendall(data)
    assert recv_exactly(server, SENT, timeout=10) == data
    # the origin has every byte: an ACK not held would leave within the window (the peer's
    # bytes_acked only grows, so its value at the end covers the whole window)
    observe_for(HOLD_S)
    assert peer_bytes_acked(client) == 1, "bytes were acknowledged before any commit"

    assert gate.commit(server, seq_add(base, FIRST))
    assert gate.committed_seq(server) == seq_add(base, FIRST)
    _wait_acked(client, 1 + FIRST)
    observe_for(HOLD_S)  # likewise: an ACK beyond the commit would have come by now
    assert peer_bytes_acked(client) == 1 + FIRST, "acknowledged beyond the commit"

    assert not gate.commit(server, seq_add(base, FIRST)), "a repeated commit moved the gate"
    assert not gate.commit(server, seq_add(base, FIRST - 1)), "a commit moved the gate back"
    assert gate.committed_seq(server) == seq_add(base, FIRST)

    assert gate.commit(server, seq_add(base, SENT))
    _wait_acked(client, 1 + SENT)
    assert gate.committed_seq(server) == seq_add(base, SENT)
