"""The unix-socket side of the local API: one frame (checkpointer/api.py) plus the descriptors
that travel with it (SCM_RIGHTS), the client's credentials (SO_PEERCRED), and the checks a
received descriptor must pass before the agent guards it. A thin shell: the frame layout and
its bounds are api's; here are the system calls.

    peer = peer_credentials(conn); authorise(peer, uids, gids)
    got = recv_request(conn, limits, version=v, deadline=time.monotonic() + timeout_s)
    if got is None: the client closed between frames
    tcp = check_descriptor(got.fds[0], guarded, states=frozenset({TcpState.ESTABLISHED}))
    send_frame(conn, api.encode(api.Registered(conn_id), got.request_id, v), deadline=...)

A client must not be able to leak descriptors into the agent or hold one of its threads:

- every read asks for the descriptors that came with its bytes (MSG_CMSG_CLOEXEC); more than the
  control buffer holds (MSG_CTRUNC) is an error and every descriptor received is closed; those a
  frame's kind does not expect are closed and counted; on any error all of them are closed;
- a frame is read exactly (header, then the length it announced, checked against the limits
  before the body is read), so a read never takes bytes or descriptors of the next frame;
- the whole frame must arrive before one deadline: a client that trickles or stalls is cut off
  with DEADLINE, whatever the size of its pieces.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import os
import socket
import stat
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from checkpointer import api
from checkpointer.api import ApiError, ErrorCode
from kernel.ici import TcpState
from kernel.repair import SIOCGSKNS, tcp_state

log = structlog.get_logger(component="tcpcp.checkpointer.fdpass")

MAX_FDS = 8
"""Descriptors one read makes room for; a message carrying more is refused (MSG_CTRUNC)."""
SO_PEERGROUPS = 59
_UCRED = struct.Struct("iII")
_INT = array.array("i").itemsize
_MAX_GROUPS = 65536
CONNECTED_OR_LISTENING = frozenset({TcpState.ESTABLISHED, TcpState.LISTEN})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------------ credentials

@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def peer_credentials(sock: socket.socket) -> Peer:
    """SO_PEERCRED (pid, uid, gid) of a connected unix socket, with the peer's supplementary
    groups (SO_PEERGROUPS) when the kernel has them."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    groups: tuple[int, ...] = ()
    for size in (64, _MAX_GROUPS):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * _INT)
        except OSError:  # ERANGE: more than fit; ENOPROTOOPT: kernel < 4.13
            continue
        groups = tuple(array.array("I", raw[: len(raw) // _INT * _INT]))
        break
    return Peer(pid, uid, gid, groups)


def authorise(peer: Peer, uids: Iterable[int], gids: Iterable[int] = ()) -> None:
    """Pass when the peer's uid is in uids or its gid or one of its groups is in gids;
    NOT_AUTHORISED naming both otherwise."""
    uids, gids = frozenset(uids), frozenset(gids)
    if peer.uid in uids or peer.gid in gids or gids.intersection(peer.groups):
        return
    raise ApiError(ErrorCode.NOT_AUTHORISED,
                   f"client {peer}: expected a uid in {_ints(uids)} or a gid in {_ints(gids)}, "
                   f"got uid {peer.uid}, gid {peer.gid}, groups {_ints(peer.groups)}")


def _ints(values: Iterable[int]) -> str:
    items = sorted(set(values))
    return "{" + ", ".join(map(str, items[:20])) + (", ...}" if len(items) > 20 else "}")


# ------------------------------------------------------------------ frames

@dataclass(frozen=True, slots=True)
class Received:
    """One frame as read: its header, body, and exactly the descriptors its kind expects (the
    caller owns and must close them); extra_closed: descriptors beyond those, already closed."""

    header: api.Header
    body: bytes
    fds: tuple[int, ...]
    extra_closed: int = 0


@dataclass(frozen=True, slots=True)
class Incoming:
    """A decoded request and the descriptors that came with it (the caller owns them)."""

    request_id: int
    request: api.Request
    fds: tuple[int, ...]
    extra_closed: int = 0


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _collect(ancillary: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) // _INT * _INT]))


def _recv_exact(sock: socket.socket, n: int, deadline: float, budget: float, fds: list[int],
                max_fds: int, what: str) -> bytes | None:
    """n bytes (None: the peer closed before the first one), with the descriptors that came
    with them appended to fds."""
    buf = bytearray()
    space = socket.CMSG_SPACE(max_fds * _INT)
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ApiError(ErrorCode.DEADLINE, f"expected {what} ({n} bytes) within "
                           f"{budget:.3g} s, got {len(buf)} bytes")
        sock.settimeout(left)
        try:
            data, ancillary, flags, _ = sock.recvmsg(n - len(buf), space,
                                                     socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ApiError(ErrorCode.DISCONNECTED, f"expected {what} ({n} bytes), the client "
                           f"went away after {len(buf)} ({exc.strerror})") from None
        _collect(ancillary, fds)
        if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
            raise ApiError(ErrorCode.DESCRIPTORS, f"expected at most {max_fds} descriptors "
                           f"with a frame, got more (control data truncated)")
        if not data:
            if not buf and what == "a frame header":
                return None
            raise ApiError(ErrorCode.DISCONNECTED, f"expected {what} ({n} bytes), the client "
                           f"closed after {len(buf)}")
        buf += data
    return bytes(buf)


def recv_frame(sock: socket.socket, limits: api.Limits, *, version: int | None,
               deadline: float, expect: frozenset[api.Kind] = api.REQUESTS,
               max_fds: int = MAX_FDS) -> Received | None:
    """One frame and its descriptors from a connected unix stream socket, all of it before
    deadline (time.monotonic()). None when the peer closed cleanly between frames. ApiError
    (DEADLINE, DISCONNECTED, DESCRIPTORS, or api's header checks) otherwise, with every
    descriptor received closed; after an error the stream is out of step: answer and close."""
    fds: list[int] = []
    budget = max(0.0, deadline - time.monotonic())
    old = sock.gettimeout()
    try:
        head = _recv_exact(sock, api.HEADER.size, deadline, budget, fds, max_fds,
                           "a frame header")
        if head is None:
            return None
        header = api.read_header(head, limits, version=version, expect=expect)
        body = _recv_exact(sock, header.length, deadline, budget, fds, max_fds,
                           f"the {header.kind.name} body") if header.length else b""
        want = api.descriptors_for(header.kind)
        if len(fds) < want:
            raise ApiError(ErrorCode.DESCRIPTORS, f"{header.kind.name}: expected {want} "
                           f"descriptor{'s' if want > 1 else ''} with the frame, got {len(fds)}",
                           header.request_id)
    except BaseException:
        _close_all(fds)
        raise
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(old)
    extra = fds[want:]
    if extra:
        _close_all(extra)
        log.warning("descriptors_closed", kind=header.kind.name, expected=want, got=len(fds))
    return Received(header, body or b"", tuple(fds[:want]), len(extra))


def recv_request(sock: socket.socket, limits: api.Limits, *, version: int | None,
                 deadline: float, max_fds: int = MAX_FDS) -> Incoming | None:
    """recv_frame, decoded as a request (its descriptors closed when it does not decode)."""
    got = recv_frame(sock, limits, version=version, deadline=deadline, max_fds=max_fds)
    if got is None:
        return None
    try:
        request = api.decode_request(got.header, got.body, limits)
    except BaseException:
        _close_all(got.fds)
        raise
    return Incoming(got.header.request_id, request, got.fds, got.extra_closed)


def send_frame(sock: socket.socket, frame: bytes, fds: Sequence[int] = (), *,
               deadline: float) -> None:
    """One frame, with fds attached to its first byte, all of it before deadline."""
    old = sock.gettimeout()
    try:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
        if sent < len(frame):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            sock.sendall(frame[sent:])
    except TimeoutError:
        raise ApiError(ErrorCode.DEADLINE, f"expected to send a frame of {len(frame)} bytes "
                       "before the deadline; the other side does not read") from None
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ApiError(ErrorCode.DISCONNECTED, f"expected to send a frame of {len(frame)} "
                       f"bytes; the other side went away ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(old)


# ------------------------------------------------------------------ descriptors

def _ip(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _endpoint(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Guarded:
    """The local endpoints the agent guards: exact (address, port) pairs, and ports on any
    address. IPv4-mapped IPv6 addresses count as their IPv4 address."""

    addresses: frozenset[tuple[IPAddress, int]] = frozenset()
    ports: frozenset[int] = frozenset()

    @classmethod
    def of(cls, addresses: Iterable[tuple[str, int]] = (), ports: Iterable[int] = ()) -> Guarded:
        pairs = frozenset((_ip(a), int(p)) for a, p in addresses)
        ports = frozenset(int(p) for p in ports)
        for port in [p for _, p in pairs] + sorted(ports):
            if not 0 < port < 65536:
                raise ValueError(f"guarded port: expected 1..65535, got {port}")
        return cls(pairs, ports)

    def covers(self, ip: IPAddress, port: int) -> bool:
        return port in self.ports or (ip, port) in self.addresses

    def __str__(self) -> str:
        items = [_endpoint(ip, p) for ip, p in sorted(self.addresses, key=str)]
        items += [f"port {p}" for p in sorted(self.ports)]
        return ", ".join(items) or "nothing"


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """A received descriptor that passed check_descriptor."""

    fd: int
    family: socket.AddressFamily
    state: TcpState
    local: tuple[IPAddress, int]
    peer: tuple[IPAddress, int] | None  # None for a listener

    def __str__(self) -> str:
        local = _endpoint(*self.local)
        return f"{local}>{_endpoint(*self.peer)}" if self.peer else f"{local} (listening)"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a pipe"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "an anonymous inode (eventfd, epoll, timerfd, ...)"


_INET_KINDS: dict[tuple[int, int], str] = {
    (socket.SOCK_DGRAM, socket.IPPROTO_UDP): "a UDP socket",
    (socket.SOCK_DGRAM, socket.IPPROTO_ICMP): "an ICMP socket",
    (socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6): "an ICMPv6 socket",
    (socket.SOCK_STREAM, socket.IPPROTO_SCTP): "an SCTP socket",
    (socket.SOCK_SEQPACKET, socket.IPPROTO_SCTP): "an SCTP socket",
    (socket.SOCK_STREAM, 262): "an MPTCP socket",
}


def _inet_kind(type_: int, proto: int) -> str:
    if type_ == socket.SOCK_RAW:
        return f"a raw socket (protocol {proto})"
    if (type_, proto) in _INET_KINDS:
        return _INET_KINDS[(type_, proto)]
    name = socket.SocketKind(type_).name if type_ in socket.SocketKind._value2member_map_ \
        else f"type {type_}"
    return f"a {name} socket of protocol {proto}"


def _netns_inode(fd: int) -> int:
    ns = fcntl.ioctl(fd, SIOCGSKNS)
    try:
        return os.fstat(ns).st_ino
    finally:
        os.close(ns)


def check_descriptor(fd: int, guarded: Guarded,
                     states: frozenset[TcpState] = CONNECTED_OR_LISTENING, *,
                     same_netns: bool = True) -> TcpSocket:
    """What a descriptor a client passed must be before the agent guards it: a socket
    (NOT_A_SOCKET), of family AF_INET/AF_INET6 (NOT_INET), TCP (NOT_TCP), in one of states
    (BAD_STATE), in the agent's network namespace when same_netns (NOT_GUARDED), with a guarded
    local address:port (NOT_GUARDED). The descriptor stays open and the caller's."""
    what = f"descriptor {fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ApiError(ErrorCode.NOT_A_SOCKET, f"{what}: expected an open socket, got "
                       f"{exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ApiError(ErrorCode.NOT_A_SOCKET, f"{what}: expected a TCP socket, got "
                       f"{_file_kind(mode)}")
    sock = socket.socket(fileno=fd)
    try:
        domain = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        if domain not in (socket.AF_INET, socket.AF_INET6):
            name = socket.AddressFamily(domain).name \
                if domain in socket.AddressFamily._value2member_map_ else f"family {domain}"
            raise ApiError(ErrorCode.NOT_INET, f"{what}: expected a TCP socket (AF_INET or "
                           f"AF_INET6), got an {name} socket")
        type_ = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        if type_ != socket.SOCK_STREAM or proto != socket.IPPROTO_TCP:
            raise ApiError(ErrorCode.NOT_TCP, f"{what}: expected a TCP socket, got "
                           f"{_inet_kind(type_, proto)}")
        state = tcp_state(sock)
        if state not in states:
            wanted = " or ".join(s.name for s in sorted(states))
            raise ApiError(ErrorCode.BAD_STATE, f"{what}: expected {wanted}, got {state.name}")
        if same_netns:
            try:
                theirs = _netns_inode(fd)
                ours = os.stat("/proc/self/ns/net").st_ino
            except OSError as exc:
                raise ApiError(ErrorCode.NOT_GUARDED, f"{what}: expected to read its network "
                               f"namespace, got {exc.strerror}") from None
            if theirs != ours:
                raise ApiError(ErrorCode.NOT_GUARDED, f"{what}: expected a socket in the "
                               f"agent's network namespace net:[{ours}], got net:[{theirs}]")
        host, port = sock.getsockname()[:2]
        local = (_ip(host), int(port))
        if not guarded.covers(*local):
            raise ApiError(ErrorCode.NOT_GUARDED, f"{what}: expected a local address the "
                           f"agent guards ({guarded}), got {_endpoint(*local)}, which is not "
                           "guarded")
        peer = None
        if state is not TcpState.LISTEN:
            phost, pport = sock.getpeername()[:2]
            peer = (_ip(phost), int(pport))
        family = socket.AddressFamily(domain)
    except OSError as exc:
        raise ApiError(ErrorCode.NOT_TCP, f"{what}: expected a TCP socket whose options can "
                       f"be read, got {exc.strerror}") from None
    finally:
        sock.detach()
    return TcpSocket(fd, family, state, local, peer)
