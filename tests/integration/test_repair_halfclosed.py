"""Half-closed connections dumped on origin and restored on standby, in the lab: each state is
reached by real peers (shutdown on either side, FINs lost at the gateway), the restored socket
is in the same state, readers see EOF after the queued bytes, every byte arrives once and the
peer never sees a RST (capture in the peer's namespace)."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kernel import repair
from kernel.ici import Ici, TcpState
from kernel.sanity import RestorePolicy
from ops import gatelab
from ops.capture import Capture
from ops.lab import Lab, _PortRules
from ops.wait import wait_until

pytestmark = pytest.mark.lab
PORT = 8600


def counting(offset: int, n: int) -> bytes:
    """The counting stream: byte i of the stream is i mod 251."""
    start = offset % 251
    reps = (start + n) // 251 + 1
    return (bytes(range(251)) * reps)[start : start + n]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    return gatelab.recv_exactly(sock, n, timeout=10.0)


def assert_eof(sock: socket.socket) -> None:
    """The stream ends here: no byte more (none twice), then EOF."""
    sock.settimeout(10.0)
    assert sock.recv(1) == b""


@pytest.fixture()
def on_origin(lab: Lab) -> Iterator[Lab]:
    lab.switch_route("origin")
    yield lab
    lab.heal()
    lab.switch_route("origin")


def connect(lab: Lab, family: int, port: int, *,
            peer_rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """peer -> service (answered by origin): (peer socket, origin socket)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with lab.enter("origin"):
        ls = socket.socket(af)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((lab.service(family), port))
        ls.listen()
    with lab.enter("peer"):
        peer = socket.socket(af)
        if peer_rcvbuf:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
        peer.settimeout(5)
        peer.connect((lab.service(family), port))
    origin, _ = ls.accept()
    ls.close()
    return peer, origin


def cut_origin_to_peer(lab: Lab) -> None:
    """Drop what origin sends to the peer at the gateway, one way: origin's kernel believes it
    sent (its FIN stays unacknowledged) while the peer's segments still arrive."""
    port = lab.host("origin").gw_port
    assert port is not None
    rules = lab._rules.setdefault(port, _PortRules())
    if rules.drop_dst >= set(lab.addresses("peer")):
        return  # already cut: re-applying would open a gap while the filter is replaced
    rules.drop_dst.update(lab.addresses("peer"))
    lab._apply(port)


def state_of(sock: socket.socket) -> TcpState:
    return repair.tcp_state(sock)


def peer_capture(lab: Lab, port: int) -> Capture:
    """Every segment of the connection as the peer's interface sees it."""
    return Capture.in_lab(lab, "peer", "eth0", f"tcp port {port}")


def assert_no_reset(cap: Capture) -> None:
    segments = cap.segments()
    assert segments, "the capture saw the connection"
    assert not [s for s in segments if s.flags & 0x04], "the peer saw or sent a RST"


@dataclass
class Case:
    """How to bring origin into a state, what the ICI must say, and what the peer then sees."""

    state: TcpState
    setup: Callable[[Lab, socket.socket, socket.socket], None]
    fin_sent: bool
    to_peer: int  # bytes origin wrote that the peer has not read yet, then (our FIN) EOF
    to_origin: int  # bytes the peer wrote that origin has not read yet


UP, DOWN = 5_000, 5_000  # within an initial window: all sent even when nothing is acked


def close_wait(lab: Lab, peer: socket.socket, origin: socket.socket) -> None:
    peer.sendall(counting(0, UP))
    peer.shutdown(socket.SHUT_WR)


def fin_wait2(lab: Lab, peer: socket.socket, origin: socket.socket) -> None:
    peer.sendall(counting(0, UP))
    origin.sendall(counting(0, DOWN))
    origin.shutdown(socket.SHUT_WR)


def fin_wait1_sent(lab: Lab, peer: socket.socket, origin: socket.socket) -> None:
    peer.sendall(counting(0, UP))
    cut_origin_to_peer(lab)
    origin.sendall(counting(0, DOWN))  # sent, lost
    origin.shutdown(socket.SHUT_WR)


def fin_wait1_unsent(lab: Lab, peer: socket.socket, origin: socket.socket) -> None:
    origin.setblocking(False)
    queued = 0
    with contextlib.suppress(BlockingIOError):
        while True:  # until the peer's closed window leaves the rest unsent
            queued += origin.send(counting(queued, 100_000))
    origin.setblocking(True)
    unsent.append(queued)
    origin.shutdown(socket.SHUT_WR)


unsent: list[int] = []


def last_ack(lab: Lab, peer: socket.socket, origin: socket.socket) -> None:
    peer.sendall(counting(0, UP))
    peer.shutdown(socket.SHUT_WR)
    wait_until(lambda: state_of(origin) is TcpState.CLOSE_WAIT, 5, what="origin in CLOSE_WAIT")
    cut_origin_to_peer(lab)
    origin.sendall(counting(0, DOWN))
    origin.shutdown(socket.SHUT_WR)


def closing(lab: Lab, peer: socket.socket, origin: socket.socket) -> None:
    cut_origin_to_peer(lab)
    origin.sendall(counting(0, DOWN))
    origin.shutdown(socket.SHUT_WR)  # lost: FIN_WAIT1
    peer.sendall(counting(0, UP))
    peer.shutdown(socket.SHUT_WR)  # arrives before ours is acked: CLOSING


CASES = {
    "close_wait": Case(TcpState.CLOSE_WAIT, close_wait, False, 0, UP),
    "fin_wait2": Case(TcpState.FIN_WAIT2, fin_wait2, True, DOWN, UP),
    "fin_wait1_sent": Case(TcpState.FIN_WAIT1, fin_wait1_sent, True, DOWN, UP),
    "fin_wait1_unsent": Case(TcpState.FIN_WAIT1, fin_wait1_unsent, False, -1, 0),
    "last_ack": Case(TcpState.LAST_ACK, last_ack, True, DOWN, UP),
    "closing": Case(TcpState.CLOSING, closing, True, DOWN, UP),
}
NEXT = {  # where each state goes once the peer has everything (and we read the peer's EOF)
    TcpState.CLOSE_WAIT: TcpState.CLOSE_WAIT,
    TcpState.FIN_WAIT2: TcpState.FIN_WAIT2,
    TcpState.FIN_WAIT1: TcpState.FIN_WAIT2,
    TcpState.LAST_ACK: TcpState.CLOSE,
    TcpState.CLOSING: TcpState.TIME_WAIT,
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", list(CASES))
def test_half_closed_connection_continues_on_standby_in_its_state_with_eof_and_no_reset(
    on_origin: Lab, name: str, family: int,
) -> None:
    lab, case = on_origin, CASES[name]
    port = PORT + 10 * family + list(CASES).index(name)
    peer, origin = connect(lab, family, port,
                           peer_rcvbuf=4096 if name == "fin_wait1_unsent" else 0)
    unsent.clear()
    case.setup(lab, peer, origin)
    wait_until(lambda: state_of(origin) is case.state, 5, what=f"origin in {case.state.name}")
    if case.state is TcpState.FIN_WAIT2 or name == "close_wait":
        wait_until(lambda: repair.dump(origin).received == counting(0, case.to_origin), 5,
                   what="the peer's bytes queued on origin")
    cut_origin_to_peer(lab)  # until the switch: a RST from the host without the socket
    ici: Ici = repair.dump(origin, stay_in_repair=True)  # never reaches the peer
    repair.discard(origin)
    to_peer = unsent[0] if case.to_peer < 0 else case.to_peer
    assert ici.state is case.state and ici.fin_sent is case.fin_sent
    assert ici.received == counting(0, case.to_origin)
    if name == "fin_wait1_unsent":
        assert ici.unsent, "the peer's closed window left nothing unsent"
    with peer_capture(lab, port) as cap:
        with lab.enter("standby"):
            restored = repair.restore(ici, RestorePolicy.serving(lab.service(family)))
        lab.switch_route("standby")
        lab.heal()
        sock = repair.activate(restored)
        assert state_of(sock) in {case.state, NEXT[case.state]}
        if case.state is not TcpState.FIN_WAIT1:  # an unacked FIN goes only on the RTO
            assert state_of(sock) is case.state
        # the peer reads what origin had written, then our EOF where origin had shut down
        peer_seen = recv_exactly(peer, to_peer) if case.state in (
            TcpState.FIN_WAIT1, TcpState.LAST_ACK, TcpState.CLOSING) else b""
        if case.state is TcpState.FIN_WAIT2:
            peer_seen = recv_exactly(peer, to_peer)
        assert peer_seen == counting(0, to_peer if case.state is not TcpState.CLOSE_WAIT else 0)
        if ici.our_fin:
            assert_eof(peer)
        # the restored socket reads the peer's bytes, then EOF where the peer had shut down
        assert recv_exactly(sock, case.to_origin) == counting(0, case.to_origin)
        if ici.peer_fin:
            assert_eof(sock)
        else:  # the peer can still write, and then close
            peer.sendall(counting(case.to_origin, 10_000))
            assert recv_exactly(sock, 10_000) == counting(case.to_origin, 10_000)
            peer.shutdown(socket.SHUT_WR)
            assert_eof(sock)
        if not ici.our_fin:  # the restored side can still write, and then close
            sock.sendall(counting(0, 10_000))
            assert recv_exactly(peer, 10_000) == counting(0, 10_000)
            sock.shutdown(socket.SHUT_WR)
            assert_eof(peer)
        # both FINs exchanged: the socket is closed (a TIME_WAIT minisocket takes over)
        wait_until(lambda: state_of(sock) is TcpState.CLOSE, 10, what="restored socket closed")
        peer.close()
    sock.close()
    assert_no_reset(cap)


@pytest.mark.parametrize("fin_acked", [False, True])
def test_curl_download_whose_server_already_sent_its_fin_completes_from_standby(
    on_origin: Lab, tmp_path: pathlib.Path, fin_acked: bool,
) -> None:
    """The server wrote the whole response and shut down: either curl's kernel took all of it
    and acked the FIN (FIN_WAIT2, curl stopped before reading it) or none of it got through yet
    (FIN_WAIT1, the FIN queued behind unsent bytes); the connection moves to standby; curl gets
    every byte and the end of the stream, and exits 0."""
    lab = on_origin
    port = PORT + 90 + fin_acked
    body = counting(0, 40_000 if fin_acked else 3 << 20)  # within curl's first window, or not
    with lab.enter("origin"):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((lab.service(4), port))
        ls.listen()
    out = tmp_path / "body"
    with peer_capture(lab, port) as cap:
        curl = lab.popen("peer", ["curl", "-sS", "--limit-rate", "1M", "-o", str(out),
                                  f"http://{lab.service(4)}:{port}/file"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ls.settimeout(10)
        server, _ = ls.accept()
        ls.close()
        server.setsockopt(socket.SOL_SOCKET, repair.SO_SNDBUFFORCE, 8 << 20)  # all queued
        request = b""
        while not request.endswith(b"\r\n\r\n"):
            request += server.recv(4096)
        assert request.startswith(b"GET /file HTTP/1.1\r\n")
        if fin_acked:
            curl.send_signal(signal.SIGSTOP)  # its kernel still takes the response and FIN
        else:
            cut_origin_to_peer(lab)
        server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                       % len(body) + body)
        server.shutdown(socket.SHUT_WR)
        want = TcpState.FIN_WAIT2 if fin_acked else TcpState.FIN_WAIT1
        wait_until(lambda: state_of(server) is want, 10, what=f"server in {want.name}")
        cut_origin_to_peer(lab)
        ici = repair.dump(server, stay_in_repair=True)
        repair.discard(server)
        assert ici.state is want and ici.fin_sent is fin_acked
        assert bool(ici.unsent) is not fin_acked
        with lab.enter("standby"):
            restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)))
        lab.switch_route("standby")
        lab.heal()
        sock = repair.activate(restored)
        curl.send_signal(signal.SIGCONT)
        _, err = curl.communicate(timeout=30)
        assert curl.returncode == 0, err
        assert out.read_bytes() == body
        assert_eof(sock)  # curl closed after the end of the response
        wait_until(lambda: state_of(sock) is TcpState.CLOSE, 10, what="restored socket closed")
        sock.close()
    assert_no_reset(cap)


def test_request_half_closed_by_the_client_is_answered_from_standby(on_origin: Lab) -> None:
    """The client sent its request and shut down writing (origin in CLOSE_WAIT, the request
    unread); on standby the server reads the request, then EOF, and answers; the client reads
    the whole answer and EOF."""
    lab = on_origin
    peer, origin = connect(lab, 4, PORT + 91)
    request = b"GET /half-closed HTTP/1.0\r\n\r\n"
    peer.sendall(request)
    peer.shutdown(socket.SHUT_WR)
    wait_until(lambda: state_of(origin) is TcpState.CLOSE_WAIT, 5, what="origin in CLOSE_WAIT")
    with peer_capture(lab, PORT + 91) as cap:
        cut_origin_to_peer(lab)
        ici = repair.dump(origin, stay_in_repair=True)
        repair.discard(origin)
        assert ici.received == request
        with lab.enter("standby"):
            restored = repair.restore(ici, RestorePolicy.serving(lab.service(4)))
        lab.switch_route("standby")
        lab.heal()
        sock = repair.activate(restored)
        assert recv_exactly(sock, len(request)) == request
        assert_eof(sock)
        answer = b"HTTP/1.0 200 OK\r\n\r\n" + counting(0, 200_000)
        sock.sendall(answer)
        sock.close()
        assert recv_exactly(peer, len(answer)) == answer
        assert_eof(peer)
        peer.close()
    assert_no_reset(cap)
