"""The local API's unix-socket shell (checkpointer/fdpass.py) on the real kernel, as root, without
the lab: descriptors passed with SCM_RIGHTS over socketpair(AF_UNIX), real TCP sockets on
127.0.0.1 and ::1. A passed TCP socket is the same socket; every other kind of descriptor, state
or address is refused with its own code; descriptors a frame does not expect are closed; clients
are authorised by SO_PEERCRED; a stalled client is cut off at its deadline while others are
served; an oversized length is refused without reading the body."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from checkpointer import api
from checkpointer.api import ApiError, Close, Contract, ErrorCode, Hello, Kind, RegisterConnection
from checkpointer.fdpass import (
    MAX_FDS,
    Guarded,
    authorise,
    check_descriptor,
    peer_credentials,
    recv_request,
    send_frame,
)
from kernel.ici import TcpState
from kernel.repair import tcp_state
from ops.wait import wait_until

LIMITS = api.Limits()
REGISTER = api.encode(RegisterConnection(0, 0, Contract.REGENERABLE), 1)
NOBODY = 65534


def soon(s: float = 5.0) -> float:
    return time.monotonic() + s


def open_fds() -> set[int]:
    """The process's open descriptors, less the one the listing itself used (closed by now)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def unix() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


@contextlib.contextmanager
def tcp(host: str) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(listener, client, accepted server side) on host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(8)
    client = socket.create_connection(ls.getsockname()[:2])
    server, _ = ls.accept()
    with ls, client, server:
        yield ls, client, server


def pass_one(unix: tuple[socket.socket, socket.socket], fd: int, frame: bytes = REGISTER
             ) -> int:
    """Send fd with a REGISTER frame over the pair and return the descriptor received."""
    a, b = unix
    send_frame(a, frame, [fd], deadline=soon())
    got = recv_request(b, LIMITS, version=1, deadline=soon())
    assert got is not None and len(got.fds) == 1
    return got.fds[0]


def refusal(unix: tuple[socket.socket, socket.socket], fd: int, guarded: Guarded) -> ApiError:
    received = pass_one(unix, fd)
    try:
        with pytest.raises(ApiError) as err:
            check_descriptor(received, guarded)
        os.fstat(received)  # the check leaves the descriptor open: it is the caller's
    finally:
        os.close(received)
    return err.value


# ------------------------------------------------------------------ passing and checking

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_passed_tcp_connection_is_the_same_socket(unix: tuple[socket.socket, socket.socket],
                                                    host: str) -> None:
    with tcp(host) as (ls, client, server):
        port = ls.getsockname()[1]
        received = pass_one(unix, server.fileno())
        try:
            got = check_descriptor(received, Guarded.of(ports=[port]))
            assert got.state is TcpState.ESTABLISHED and got.fd == received
            assert (str(got.local[0]), got.local[1]) == server.getsockname()[:2]
            assert got.peer is not None
            assert (str(got.peer[0]), got.peer[1]) == server.getpeername()[:2]
            os.write(received, b"through the passed descriptor")
            client.settimeout(5)
            assert client.recv(100) == b"through the passed descriptor"
        finally:
            os.close(received)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_passed_listener_is_accepted_by_address(unix: tuple[socket.socket, socket.socket],
                                                  host: str) -> None:
    with tcp(host) as (ls, _, _):
        port = ls.getsockname()[1]
        received = pass_one(unix, ls.fileno())
        try:
            got = check_descriptor(received, Guarded.of(addresses=[(host, port)]))
            assert got.state is TcpState.LISTEN and got.peer is None
            assert str(got) == (f"[{host}]:{port} (listening)" if ":" in host
                                else f"{host}:{port} (listening)")
        finally:
            os.close(received)


def test_a_pipe_is_not_a_socket(unix: tuple[socket.socket, socket.socket]) -> None:
    r, w = os.pipe()
    try:
        err = refusal(unix, r, Guarded.of(ports=[1]))
    finally:
        os.close(r)
        os.close(w)
    assert err.code is ErrorCode.NOT_A_SOCKET
    assert err.message.endswith("expected a TCP socket, got a pipe")


def test_a_udp_socket_is_not_tcp(unix: tuple[socket.socket, socket.socket]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        err = refusal(unix, udp.fileno(), Guarded.of(ports=[udp.getsockname()[1]]))
    assert err.code is ErrorCode.NOT_TCP
    assert "expected a TCP socket, got a UDP socket" in err.message


def test_a_unix_socket_is_not_inet(unix: tuple[socket.socket, socket.socket]) -> None:
    x, y = socket.socketpair()
    with x, y:
        err = refusal(unix, x.fileno(), Guarded.of(ports=[1]))
    assert err.code is ErrorCode.NOT_INET
    assert "(AF_INET or AF_INET6), got an AF_UNIX socket" in err.message


def test_a_connection_still_in_syn_sent_is_refused(unix: tuple[socket.socket, socket.socket]
                                                   ) -> None:
    # a listener whose accept queue is full drops further SYNs: their connects stay in SYN_SENT
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        clients = [socket.socket() for _ in range(3)]
        try:
            for c in clients:
                c.setblocking(False)
                c.connect_ex(ls.getsockname())
            pending = wait_until(lambda: [c for c in clients
                                          if tcp_state(c) is TcpState.SYN_SENT], 5,
                                 what="a connect in SYN_SENT")
            err = refusal(unix, pending[0].fileno(), Guarded.of(ports=range(1, 65536)))
        finally:
            for c in clients:
                c.close()
    assert err.code is ErrorCode.BAD_STATE
    assert err.message.endswith("expected ESTABLISHED or LISTEN, got SYN_SENT")


def test_closing_connections_are_refused_with_their_state(
        unix: tuple[socket.socket, socket.socket]) -> None:
    with tcp("127.0.0.1") as (_, client, server):
        guarded = Guarded.of(ports=range(1, 65536))
        client.shutdown(socket.SHUT_WR)
        wait_until(lambda: tcp_state(server) is TcpState.CLOSE_WAIT, 5, what="CLOSE_WAIT")
        err = refusal(unix, server.fileno(), guarded)
        assert err.code is ErrorCode.BAD_STATE and err.message.endswith("got CLOSE_WAIT")
        server.shutdown(socket.SHUT_WR)
        # the active closer's connection went to TIME_WAIT; its descriptor is left in CLOSE
        wait_until(lambda: tcp_state(client) is TcpState.CLOSE, 5, what="client in CLOSE")
        err = refusal(unix, client.fileno(), guarded)
        assert err.code is ErrorCode.BAD_STATE and err.message.endswith("got CLOSE")


def test_a_socket_on_an_unguarded_address_is_refused_naming_the_guarded_ones(
        unix: tuple[socket.socket, socket.socket]) -> None:
    with tcp("127.0.0.1") as (ls, _, server):
        port = ls.getsockname()[1]
        err = refusal(unix, server.fileno(), Guarded.of(addresses=[("127.0.0.2", port)],
                                                         ports=[1]))
    assert err.code is ErrorCode.NOT_GUARDED
    assert err.message.endswith(f"expected a local address the agent guards (127.0.0.2:{port}, "
                                f"port 1), got 127.0.0.1:{port}, which is not guarded")


def test_a_socket_of_another_network_namespace_is_refused(
        unix: tuple[socket.socket, socket.socket]) -> None:
    made: list[socket.socket] = []

    def elsewhere() -> None:  # this thread alone moves to a new namespace, then ends
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        s = socket.socket()
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        made.append(s)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert made, "the thread could not make a socket in a new network namespace"
    with made[0] as ls:
        err = refusal(unix, ls.fileno(), Guarded.of(ports=[ls.getsockname()[1]]))
    assert err.code is ErrorCode.NOT_GUARDED
    assert "expected a socket in the agent's network namespace" in err.message


def test_each_refusal_has_its_own_code() -> None:
    codes = {ErrorCode.NOT_A_SOCKET, ErrorCode.NOT_INET, ErrorCode.NOT_TCP,
             ErrorCode.BAD_STATE, ErrorCode.NOT_GUARDED, ErrorCode.DESCRIPTORS,
             ErrorCode.NOT_AUTHORISED, ErrorCode.DEADLINE, ErrorCode.TOO_LARGE}
    assert len({c.value for c in codes}) == len(codes)


# ------------------------------------------------------------------ unexpected descriptors

def test_descriptors_beyond_what_the_frame_expects_are_closed(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix
    with tcp("127.0.0.1") as (ls, client, server):
        before = open_fds()
        send_frame(a, REGISTER, [server.fileno(), client.fileno(), ls.fileno()], deadline=soon())
        got = recv_request(b, LIMITS, version=1, deadline=soon())
        assert got is not None and len(got.fds) == 1 and got.extra_closed == 2
        assert open_fds() == before | {got.fds[0]}
        os.close(got.fds[0])

        send_frame(a, api.encode(Close(3), 2), [server.fileno()], deadline=soon())
        got = recv_request(b, LIMITS, version=1, deadline=soon())
        assert got is not None and got.fds == () and got.extra_closed == 1
        assert got.request == Close(3) and got.request_id == 2
        assert open_fds() == before


def test_more_descriptors_than_the_control_buffer_holds_are_refused_and_none_leak(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix
    pipes = [os.pipe() for _ in range(MAX_FDS)]
    try:
        before = open_fds()
        send_frame(a, REGISTER, [fd for p in pipes for fd in p], deadline=soon())
        with pytest.raises(ApiError) as err:
            recv_request(b, LIMITS, version=1, deadline=soon())
        assert err.value.code is ErrorCode.DESCRIPTORS
        assert open_fds() == before
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_register_without_its_descriptor_is_refused(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix
    send_frame(a, REGISTER, deadline=soon())
    with pytest.raises(ApiError) as err:
        recv_request(b, LIMITS, version=1, deadline=soon())
    assert err.value.code is ErrorCode.DESCRIPTORS and err.value.request_id == 1
    assert "REGISTER_CONNECTION: expected 1 descriptor with the frame, got 0" in \
        err.value.message


def test_a_frame_that_does_not_decode_closes_its_descriptor(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix
    bad = bytearray(REGISTER)
    bad[api.HEADER.size + 16] = 9  # the contract
    r, w = os.pipe()
    try:
        before = open_fds()
        send_frame(a, bytes(bad), [r], deadline=soon())
        with pytest.raises(ApiError) as err:
            recv_request(b, LIMITS, version=1, deadline=soon())
        assert err.value.code is ErrorCode.MALFORMED and "contract" in err.value.message
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------------ credentials

def test_a_client_of_this_host_s_root_is_authorised(
        unix: tuple[socket.socket, socket.socket]) -> None:
    peer = peer_credentials(unix[1])
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    authorise(peer, {0})


_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
s.settimeout(10)
print(s.recv(4096).hex())
"""


def test_a_client_of_a_uid_not_allowed_is_refused() -> None:
    home = tempfile.mkdtemp(prefix="tcpcp-fdpass-")
    path = os.path.join(home, "agent.sock")
    try:
        os.chmod(home, 0o755)
        with socket.socket(socket.AF_UNIX) as srv:
            srv.bind(path)
            os.chmod(path, 0o777)  # reachable: the refusal under test is the agent's own
            srv.listen(1)
            child = subprocess.Popen(["/usr/bin/python3", "-c", _CLIENT, path,
                                      api.encode(Hello(), 5).hex()],
                                     user=NOBODY, group=NOBODY, extra_groups=[],
                                     stdout=subprocess.PIPE, text=True)
            srv.settimeout(10)
            conn, _ = srv.accept()
            with conn:
                peer = peer_credentials(conn)
                assert (peer.pid, peer.uid, peer.gid) == (child.pid, NOBODY, NOBODY)
                with pytest.raises(ApiError) as err:
                    authorise(peer, {0}, {0})
                got = recv_request(conn, LIMITS, version=None, deadline=soon())
                assert got is not None
                send_frame(conn, api.encode(api.Error.of(err.value), got.request_id, 0),
                           deadline=soon())
            out, _ = child.communicate(timeout=10)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(home)
    assert err.value.code is ErrorCode.NOT_AUTHORISED
    assert f"uid {NOBODY}" in err.value.message and "expected a uid in {0}" in err.value.message
    rid, reply = api.parse_reply(bytes.fromhex(out.strip()), LIMITS, version=None)
    assert rid == 5 and reply == api.Error.of(err.value)


# ------------------------------------------------------------------ deadlines and bounds

def test_a_stalled_client_is_cut_off_at_its_deadline_while_another_is_served() -> None:
    results: dict[str, object] = {}
    budget = 3.0

    def serve(name: str, conn: socket.socket) -> None:
        started = time.monotonic()
        try:
            got = recv_request(conn, LIMITS, version=1, deadline=started + budget)
            assert got is not None
            send_frame(conn, api.encode(api.Done(3), got.request_id), deadline=soon())
            results[name] = got.request
        except ApiError as exc:
            results[name] = (exc, time.monotonic() - started)

    stalled_c, stalled_s = socket.socketpair()
    good_c, good_s = socket.socketpair()
    with stalled_c, stalled_s, good_c, good_s:
        frame = api.encode(Close(3), 8)
        stalled_c.sendall(frame[:8])  # half a header, then nothing
        threads = [threading.Thread(target=serve, args=("stalled", stalled_s)),
                   threading.Thread(target=serve, args=("good", good_s))]
        threads[0].start()
        threads[1].start()
        good_c.sendall(frame)
        good_c.settimeout(10)
        assert api.parse_reply(good_c.recv(4096), LIMITS, version=1) == (8, api.Done(3))
        assert "stalled" not in results  # the other client was served while this one stalls
        wait_until(lambda: "stalled" in results, 10, what="the stalled client cut off")
        for t in threads:
            t.join()
    assert results["good"] == Close(3)
    stalled = results["stalled"]
    assert isinstance(stalled, tuple)
    exc, waited = stalled
    assert isinstance(exc, ApiError) and exc.code is ErrorCode.DEADLINE
    assert exc.message == "expected a frame header (16 bytes) within 3 s, got 8 bytes"
    assert waited >= budget


def test_an_oversized_length_is_refused_without_reading_the_body(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix
    a.sendall(api.HEADER.pack(api.MAGIC, 1, Kind.COMMIT, 0, 6, 1 << 31) + b"0123456789")
    with pytest.raises(ApiError) as err:
        recv_request(b, LIMITS, version=1, deadline=soon(30))
    assert err.value.code is ErrorCode.TOO_LARGE and err.value.request_id == 6
    # not DEADLINE: it did not wait for the body; and the body's bytes are still unread
    assert b.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"0123456789"


def test_a_client_that_closes_between_frames_or_within_one(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix
    frame = api.encode(Close(3), 1)
    a.sendall(frame + frame[:20])
    a.shutdown(socket.SHUT_WR)
    got = recv_request(b, LIMITS, version=1, deadline=soon())
    assert got is not None and got.request == Close(3)
    with pytest.raises(ApiError) as err:
        recv_request(b, LIMITS, version=1, deadline=soon())
    assert err.value.code is ErrorCode.DISCONNECTED
    assert "the CLOSE body (8 bytes), the client closed after 4" in err.value.message

    c, d = socket.socketpair()
    with c, d:
        c.close()
        assert recv_request(d, LIMITS, version=1, deadline=soon()) is None


def test_sending_to_a_client_that_does_not_read_stops_at_the_deadline(
        unix: tuple[socket.socket, socket.socket]) -> None:
    a, _ = unix
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frame = api.encode(api.Error(ErrorCode.INTERNAL, "x"), 1) * 200_000
    with pytest.raises(ApiError) as err:
        send_frame(a, frame, deadline=soon(0.5))
    assert err.value.code is ErrorCode.DEADLINE
